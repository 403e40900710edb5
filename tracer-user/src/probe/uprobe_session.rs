//! Uprobe sessions (kernel ≥ 6.13) for `malloc` and `calloc`, loaded and attached with bpf(2)
//! directly.
//!
//! A session program runs at a call and, only if its entry asked for it, at that call's
//! return: an unsampled, nested or untraced `malloc` then costs one trap instead of two.
//! aya 0.16 loads `uprobe.multi` programs but not sessions, whose attach type must be fixed
//! at load time. So the instructions are taken from aya-obj and relocated against the maps
//! aya has already created: both sides share every map and global.

use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    io, mem,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use aya::{Ebpf, maps::Map};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};

/// Bytes of verifier log asked for when a load fails, to explain why.
const VERIFIER_LOG_BYTES: usize = 1 << 20;

/// A session program loaded into the kernel; dropping it unloads it once no link holds it.
#[derive(Debug)]
pub struct SessionProgram {
    fd: OwnedFd,
}

/// Why a session program could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The kernel has no uprobe sessions (before 6.13): plain uprobes must do.
    Unsupported(io::Error),
    /// Anything else: a bug, reported with the verifier's log.
    Failed(String),
}

impl SessionProgram {
    /// Loads the two programs `names` from `object`, whose maps `ebpf` (loaded from the same
    /// bytes) owns. The object is relocated once for both.
    pub fn load_pair(object: &[u8], ebpf: &Ebpf, names: [&str; 2]) -> Result<[Self; 2], LoadError> {
        let obj = relocated(object, ebpf).map_err(LoadError::Failed)?;
        let [first, second] = names.map(|name| Self::load(&obj, name));
        Ok([first?, second?])
    }

    /// Loads program `name` from the relocated `obj`.
    fn load(obj: &aya_obj::Object, name: &str) -> Result<Self, LoadError> {
        let program = obj.programs.get(name).ok_or_else(|| {
            LoadError::Failed(format!("program {name} missing from the eBPF object"))
        })?;
        let insns = &obj.functions[&program.function_key()].instructions;
        let license = program.license.as_c_str();
        match prog_load(name, insns, license, None) {
            Ok(fd) => Ok(Self { fd }),
            // Rejected before the verifier ran (no log): the kernel does not know the
            // session attach type. With a log, the program itself is at fault.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let mut log = vec![0u8; VERIFIER_LOG_BYTES];
                match prog_load(name, insns, license, Some(&mut log)) {
                    Ok(fd) => Ok(Self { fd }),
                    Err(_) if log[0] == 0 => Err(LoadError::Unsupported(e)),
                    Err(e) => Err(LoadError::Failed(format!(
                        "{name}: {e}; verifier log:\n{}",
                        String::from_utf8_lossy(&log)
                            .trim_end_matches('\0')
                            .trim_end()
                    ))),
                }
            }
            Err(e) => Err(LoadError::Failed(format!("{name}: {e}"))),
        }
    }

    /// Attaches the session at `offsets` in `library` (file offsets), each with its cookie,
    /// for process `pid` (0: every process). Detached when the returned link is dropped, or
    /// when this process dies, however it dies.
    pub fn attach(
        &self,
        library: &Path,
        offsets: &[u64],
        cookies: &[u64],
        pid: u32,
    ) -> io::Result<OwnedFd> {
        if offsets.len() != cookies.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let path = CString::new(library.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: all-zero is a valid bpf_attr (every unused field must be zero).
        let mut attr: bpf_attr = unsafe { mem::zeroed() };
        // SAFETY: writing plain integers into the union's link_create member.
        unsafe {
            let link = &mut attr.link_create;
            link.__bindgen_anon_1.prog_fd = self.fd.as_raw_fd() as u32;
            link.attach_type = bpf_attach_type::BPF_TRACE_UPROBE_SESSION as u32;
            let multi = &mut link.__bindgen_anon_3.uprobe_multi;
            multi.path = path.as_ptr() as u64;
            multi.offsets = offsets.as_ptr() as u64;
            multi.cookies = cookies.as_ptr() as u64;
            multi.cnt = offsets.len() as u32;
            multi.pid = pid;
        }
        bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
    }
}

/// The object with every program linked with its subprograms and pointing at `ebpf`'s maps.
fn relocated(object: &[u8], ebpf: &Ebpf) -> Result<aya_obj::Object, String> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
    if obj.has_btf_relocations() {
        let btf = aya_obj::btf::Btf::from_sys_fs().map_err(|e| e.to_string())?;
        obj.relocate_btf(&btf).map_err(|e| e.to_string())?;
    }
    obj.resolve_externs(None).map_err(|e| e.to_string())?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|&(section, _)| section).collect();
    let maps = mem::take(&mut obj.maps);
    let mut with_fds = Vec::with_capacity(maps.len());
    for (map_name, map) in &maps {
        let fd = ebpf
            .map(map_name)
            .map(map_fd)
            .ok_or_else(|| format!("map {map_name} was not created"))?;
        with_fds.push((map_name.as_str(), fd, map));
    }
    obj.relocate_maps(with_fds.into_iter(), &text_sections)
        .map_err(|e| e.to_string())?;
    obj.relocate_externs().map_err(|e| e.to_string())?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| e.to_string())?;
    Ok(obj)
}

/// The descriptor behind any aya map (every variant wraps the same `MapData`).
fn map_fd(map: &Map) -> RawFd {
    let data = match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    };
    data.fd().as_fd().as_raw_fd()
}

fn prog_load(
    name: &str,
    insns: &[bpf_insn],
    license: &CStr,
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid bpf_attr (every unused field must be zero).
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    // SAFETY: writing plain integers into the union's prog_load member.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
    load.expected_attach_type = bpf_attach_type::BPF_TRACE_UPROBE_SESSION as u32;
    load.insns = insns.as_ptr() as u64;
    load.insn_cnt = insns.len() as u32;
    load.license = license.as_ptr() as u64;
    let name_room = load.prog_name.len() - 1; // keeps the terminating NUL
    for (dst, &src) in load
        .prog_name
        .iter_mut()
        .zip(name.as_bytes().iter().take(name_room))
    {
        *dst = src as _;
    }
    if let Some(log) = log {
        load.log_level = 1;
        load.log_buf = log.as_mut_ptr() as u64;
        load.log_size = log.len() as u32;
    }
    bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
}

/// bpf(2) for the commands that return a new descriptor.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr of the size passed; every pointer
    // in it refers to memory that outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success these commands return a descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}
