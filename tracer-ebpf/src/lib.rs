//! Present only so `tracer-user` can name this crate as a build dependency (aya-build builds
//! the eBPF binary itself); the programs live in `main.rs`.
#![no_std]
