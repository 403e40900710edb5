//! Which way each traced process's stacks are captured.
//!
//! A frame-pointer walk in the kernel is the cheapest stack there is, but on code built
//! without frame pointers (Debian's libraries, Rust release builds, most `-O2` C) it skips
//! callers and then follows garbage. So the choice is made per binary: frame pointers when
//! the executable's functions set them up, the modules' CFI otherwise, compiled into tables
//! the kernel walks (`dwarf`); copying the stack for userspace to unwind (`dwarf-copy`) is
//! kept for code tables cannot serve, and taken per event where the walk meets such code.

use std::path::Path;

use object::{Object as _, ObjectSection as _};

/// How stacks are captured for one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StackMode {
    /// The kernel walks frame pointers into a deduplicated stack-map id.
    FramePointers,
    /// The kernel walks the modules' CFI, compiled into unwind tables, into a deduplicated
    /// stack id as with frame pointers.
    Dwarf,
    /// The top of the stack is copied and unwound in userspace with `.eh_frame` CFI.
    DwarfCopy,
}

impl StackMode {
    /// The kernel's `tracer_common::unwind::walk` value for this mode.
    pub fn walk(self) -> u32 {
        use tracer_common::unwind::walk;
        match self {
            Self::FramePointers => walk::FRAME_POINTERS,
            Self::Dwarf => walk::TABLES,
            Self::DwarfCopy => walk::COPY,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::FramePointers => "fp",
            Self::Dwarf => "dwarf",
            Self::DwarfCopy => "dwarf-copy",
        }
    }
}

/// The mode chosen for a process, and why (shown in the report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub mode: StackMode,
    pub reason: String,
    /// `--stack-mode fp` forced on an executable whose functions mostly do not keep frame
    /// pointers: its stacks will miss callers, which the report must say.
    pub doubtful: bool,
    /// The executable could not be read (a process gone before it was looked at): the mode
    /// is a default, and a decision made earlier from the program's file is better.
    pub guessed: bool,
}

/// A binary whose functions start with `push %rbp; mov %rsp,%rbp` keeps frame pointers.
/// Any function without one makes a frame-pointer walk skip its caller, so `fp` is chosen
/// only when nearly all do: a Rust release build links a standard library built with frame
/// pointers (~70% of its functions) while its own code has none, and `dwarf` is right there.
const FP_SHARE: f64 = 0.9;
/// Functions shorter than this are not judged: C runtime stubs (`_start`, `frame_dummy`)
/// never set up frames, and tiny leaves do not call the allocator.
const MIN_FUNCTION_BYTES: u64 = 64;
/// Runtime functions every C executable carries without frames (`__do_global_dtors_aux`,
/// `register_tm_clones` …): this many frameless functions never rule `fp` out.
const RUNTIME_STUBS: usize = 4;

/// Chooses for `binary` (`forced` wins when the user gave `--stack-mode`).
pub fn decide(forced: Option<StackMode>, binary: Option<&Path>) -> Decision {
    if let Some(mode) = forced {
        let auto = decide(None, binary);
        // An executable that could not be read (a process gone before it was looked at)
        // proves nothing about frame pointers: no warning on a guess.
        let doubtful = mode == StackMode::FramePointers
            && auto.mode != StackMode::FramePointers
            && !auto.guessed;
        let reason = if doubtful {
            format!(
                "--stack-mode fp, although {}: stacks will miss the callers of functions \
                 without one (auto would choose dwarf)",
                auto.reason
            )
        } else {
            "--stack-mode".into()
        };
        return Decision {
            mode,
            reason,
            doubtful,
            guessed: auto.guessed,
        };
    }
    let Some(binary) = binary else {
        return Decision {
            mode: StackMode::Dwarf,
            reason: "executable unknown: unwound in the kernel with the modules' CFI tables".into(),
            doubtful: false,
            guessed: true,
        };
    };
    let share = std::fs::read(binary)
        .ok()
        .and_then(|data| frame_pointer_share(&data));
    match share {
        Some((with_fp, functions)) if functions > 0 => {
            let pct = 100.0 * with_fp as f64 / functions as f64;
            let without = functions - with_fp;
            let mostly =
                pct / 100.0 >= FP_SHARE || (without <= RUNTIME_STUBS && with_fp >= without);
            let mode = if with_fp > 0 && mostly {
                StackMode::FramePointers
            } else {
                StackMode::Dwarf
            };
            let how = match mode {
                StackMode::FramePointers => "",
                _ => ": unwound in the kernel with the modules' CFI tables",
            };
            Decision {
                mode,
                reason: format!(
                    "{pct:.0}% of the executable's {functions} functions set up frame \
                     pointers{how}"
                ),
                doubtful: false,
                guessed: false,
            }
        }
        _ => {
            let guessed = std::fs::metadata(binary).is_err();
            Decision {
                mode: StackMode::Dwarf,
                guessed,
                reason: if guessed {
                    UNREADABLE.into()
                } else {
                    "the executable has no readable unwind index: unwound in the kernel with \
                     the modules' CFI tables"
                        .into()
                },
                doubtful: false,
            }
        }
    }
}

/// Why `auto` chose `dwarf` for an executable it could not open.
const UNREADABLE: &str = "the executable could not be read (gone already?): unwound in the kernel with the modules' \
     CFI tables";

/// (functions whose code sets up a frame pointer, functions examined), from the function
/// starts in `.eh_frame_hdr`, which stripped binaries keep too.
pub fn frame_pointer_share(data: &[u8]) -> Option<(usize, usize)> {
    let file = object::File::parse(data).ok()?;
    let hdr = file.section_by_name(".eh_frame_hdr")?;
    let starts = function_starts(hdr.data().ok()?, hdr.address())?;
    let text = file.section_by_name(".text")?;
    let text_range = text.address()..text.address() + text.size();
    let mut examined = 0;
    let mut with_fp = 0;
    for (i, &start) in starts.iter().enumerate() {
        // The table is sorted; a function's length is the distance to the next one.
        let len = starts.get(i + 1).map_or(u64::MAX, |next| next - start);
        if !text_range.contains(&start) || len < MIN_FUNCTION_BYTES {
            continue;
        }
        let Some(code) = code_at(&file, data, start) else {
            continue;
        };
        examined += 1;
        if sets_up_frame_pointer(code) {
            with_fp += 1;
        }
    }
    Some((with_fp, examined))
}

/// `push %rbp; mov %rsp,%rbp`, optionally after `endbr64`.
fn sets_up_frame_pointer(code: &[u8]) -> bool {
    const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
    const PROLOGUE: [u8; 4] = [0x55, 0x48, 0x89, 0xe5];
    let code = code.strip_prefix(&ENDBR64[..]).unwrap_or(code);
    code.starts_with(&PROLOGUE)
}

fn code_at<'d>(file: &object::File<'d>, data: &'d [u8], addr: u64) -> Option<&'d [u8]> {
    let offset = super::elf::file_offset_of(file, addr)?;
    let bytes = data.get(offset as usize..)?;
    Some(&bytes[..bytes.len().min(8)])
}

/// Function start addresses from an `.eh_frame_hdr` binary-search table, sorted. Only the
/// encodings every x86-64 toolchain emits are read (`sdata4`/`udata4`, table `datarel`).
fn function_starts(hdr: &[u8], hdr_addr: u64) -> Option<Vec<u64>> {
    const DW_EH_PE_UDATA4: u8 = 0x03;
    const DW_EH_PE_SDATA4: u8 = 0x0b;
    const DW_EH_PE_DATAREL_SDATA4: u8 = 0x3b;
    let (&version, rest) = hdr.split_first()?;
    let [ptr_enc, count_enc, table_enc] = *rest.first_chunk::<3>()?;
    if version != 1
        || ptr_enc & 0x0f != DW_EH_PE_SDATA4
        || !matches!(count_enc, DW_EH_PE_UDATA4 | DW_EH_PE_SDATA4)
        || table_enc != DW_EH_PE_DATAREL_SDATA4
    {
        return None;
    }
    let word = |at: usize| -> Option<i32> {
        Some(i32::from_le_bytes(*hdr.get(at..at + 4)?.first_chunk()?))
    };
    let count = usize::try_from(word(8)?).ok()?;
    let mut starts = Vec::with_capacity(count.min(1 << 20));
    for i in 0..count {
        let rel = word(12 + 8 * i)?;
        starts.push(hdr_addr.wrapping_add_signed(i64::from(rel)));
    }
    starts.sort_unstable();
    Some(starts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prologues() {
        assert!(sets_up_frame_pointer(&[0x55, 0x48, 0x89, 0xe5, 0x90]));
        assert!(sets_up_frame_pointer(&[
            0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5
        ]));
        assert!(!sets_up_frame_pointer(&[0x48, 0x83, 0xec, 0x08]));
        assert!(!sets_up_frame_pointer(&[0x55, 0x53]));
    }

    #[test]
    fn reads_an_eh_frame_hdr_table() {
        let mut hdr = vec![1, 0x1b, 0x03, 0x3b];
        hdr.extend_from_slice(&(-100i32).to_le_bytes());
        hdr.extend_from_slice(&2u32.to_le_bytes());
        for (loc, fde) in [(0x200i32, 0x10i32), (-0x100, 0x20)] {
            hdr.extend_from_slice(&loc.to_le_bytes());
            hdr.extend_from_slice(&fde.to_le_bytes());
        }
        assert_eq!(function_starts(&hdr, 0x1000), Some(vec![0xf00, 0x1200]));
        hdr[3] = 0x1b;
        assert_eq!(function_starts(&hdr, 0x1000), None);
    }

    #[test]
    fn this_test_binary_is_judged() {
        // Whatever the test profile's frame-pointer setting, the index must be readable.
        let exe = std::env::current_exe().expect("test binary");
        let data = std::fs::read(exe).expect("read it");
        let (_, examined) = frame_pointer_share(&data).expect("has .eh_frame_hdr");
        assert!(examined > 100);
    }
}
