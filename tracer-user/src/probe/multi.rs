//! Uprobes as `uprobe_multi` links (Linux ≥ 6.6) and uprobe sessions (≥ 6.13), loaded and
//! attached with bpf(2) directly.
//!
//! A multi link carries one program to every offset it probes, and a hit goes straight to
//! the program. aya's other path opens a perf event per probe and process, and each hit then
//! also passes that event's pid filter: measured here, about 60 ns more per trap.
//!
//! A session program runs at a call and, only if its entry asked for it, at that call's
//! return: an unsampled, nested or untraced allocation call then costs one trap, not two.
//!
//! aya 0.16 fixes a program's attach type by its ELF section when it loads it, and cannot
//! load sessions at all. So the instructions are taken from aya-obj, relocated once against
//! the maps aya has already created (every path shares every map and global), and loaded
//! with the attach type the kernel in hand supports: one object serves every kernel.

use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    io, mem,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use aya::{Ebpf, maps::Map};
use aya_obj::generated::{
    BPF_F_UPROBE_MULTI_RETURN, bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type,
};
use tracer_common::SESSION_COOKIE_CALL;

/// Bytes of verifier log asked for when a load fails, to explain why.
const VERIFIER_LOG_BYTES: usize = 1 << 20;

/// Where a program runs in the functions it is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// At the probed instruction.
    Entry,
    /// When the probed function returns.
    Return,
    /// At the call and, if the entry returned 0, at its return.
    Session,
}

impl Hook {
    fn attach_type(self) -> bpf_attach_type {
        match self {
            Hook::Entry | Hook::Return => bpf_attach_type::BPF_TRACE_UPROBE_MULTI,
            Hook::Session => bpf_attach_type::BPF_TRACE_UPROBE_SESSION,
        }
    }
}

/// A program loaded for multi links; dropping it unloads it once no link holds it.
#[derive(Debug)]
pub struct MultiProgram {
    fd: OwnedFd,
    hook: Hook,
}

/// Why a program could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The kernel does not know the attach type (sessions before 6.13).
    Unsupported(io::Error),
    /// Anything else: a bug, reported with the verifier's log.
    Failed(String),
}

impl MultiProgram {
    /// Loads program `name` from the relocated `obj` to run as `hook`.
    pub fn load(relocated: &Relocated, name: &str, hook: Hook) -> Result<Self, LoadError> {
        let obj = &relocated.obj;
        let program = obj.programs.get(name).ok_or_else(|| {
            LoadError::Failed(format!("program {name} missing from the eBPF object"))
        })?;
        let function = &obj.functions[&program.function_key()];
        let code = Code {
            insns: &function.instructions,
            license: program.license.as_c_str(),
            btf: relocated.btf.as_ref().and_then(|fd| {
                let (info, count) = calls_only(
                    function.func_info.func_info_bytes(),
                    function.func_info_rec_size,
                )?;
                Some((fd.as_raw_fd(), info, function.func_info_rec_size, count))
            }),
        };
        let attach_type = hook.attach_type();
        match prog_load(name, &code, attach_type, None) {
            Ok(fd) => Ok(Self { fd, hook }),
            // Rejected before the verifier ran (no log): the kernel does not know the
            // session attach type. With a log, the program itself is at fault.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let mut log = vec![0u8; VERIFIER_LOG_BYTES];
                match prog_load(name, &code, attach_type, Some(&mut log)) {
                    Ok(fd) => Ok(Self { fd, hook }),
                    Err(_) if log[0] == 0 => Err(LoadError::Unsupported(e)),
                    Err(e) => Err(LoadError::Failed(format!(
                        "{name}: {e}; verifier log:\n{}",
                        String::from_utf8_lossy(&log)
                            .trim_end_matches('\0')
                            .trim_end()
                    ))),
                }
            }
            Err(e) => {
                let mut log = vec![0u8; VERIFIER_LOG_BYTES];
                let _ = prog_load(name, &code, attach_type, Some(&mut log));
                Err(LoadError::Failed(format!(
                    "{name}: {e}; verifier log:\n{}",
                    String::from_utf8_lossy(&log)
                        .trim_end_matches('\0')
                        .trim_end()
                )))
            }
        }
    }

    /// Attaches the program at `offsets` in `library` (file offsets), each with its cookie,
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
            link.attach_type = self.hook.attach_type() as u32;
            let multi = &mut link.__bindgen_anon_3.uprobe_multi;
            if self.hook == Hook::Return {
                multi.flags = BPF_F_UPROBE_MULTI_RETURN;
            }
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
pub fn relocated(object: &[u8], ebpf: &Ebpf) -> Result<Relocated, String> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
    // Every kernel with uprobe_multi has every BTF feature the object may use.
    let btf = obj
        .fixup_and_sanitize_btf(|| Some(|_: aya_obj::btf::BtfFeature| true))
        .map_err(|e| e.to_string())?
        .map(|btf| load_btf(&btf.to_bytes()))
        .transpose()
        .map_err(|e| format!("cannot load the programs' BTF: {e}"))?;
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
    Ok(Relocated { obj, btf })
}

/// The object relocated against aya's maps, and its BTF as loaded into the kernel: the
/// verifier needs the programs' function info to check `bpf_loop`'s callbacks.
pub struct Relocated {
    pub obj: aya_obj::Object,
    btf: Option<OwnedFd>,
}

fn load_btf(bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid bpf_attr (every unused field must be zero).
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    // SAFETY: writing plain integers into the union's BTF-load member.
    let load = unsafe { &mut attr.__bindgen_anon_7 };
    load.btf = bytes.as_ptr() as u64;
    load.btf_size = bytes.len() as u32;
    bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr)
}

/// `BPF_JMP | BPF_CALL`, and the source register that marks a call as a kfunc call.
const CALL_OPCODE: u8 = 0x85;
const PSEUDO_KFUNC_CALL: u8 = 2;

/// Rewrites the eBPF side's stand-in calls ([`SESSION_COOKIE_CALL`]) into calls of the
/// kernel's `bpf_session_cookie` kfunc, by its id in the kernel's BTF. aya 0.16 links kfunc
/// calls only through extern declarations the eBPF toolchain here does not emit, so the
/// stand-in is a helper call with a number no kernel uses, patched where it stands.
///
/// `kfunc` is its id in the kernel's BTF (see `kernel_btf`); `Unsupported` when the kernel
/// has no such kfunc (uprobe sessions need it, so that kernel has none worth using).
pub fn link_session_cookie(obj: &mut aya_obj::Object, kfunc: Option<u32>) -> Result<(), LoadError> {
    let id = kfunc.ok_or_else(|| {
        LoadError::Unsupported(io::Error::other(
            "the kernel's BTF has no bpf_session_cookie kfunc",
        ))
    })?;
    for function in obj.functions.values_mut() {
        for insn in &mut function.instructions {
            if insn.code == CALL_OPCODE
                && insn.src_reg() == 0
                && insn.imm as u32 == SESSION_COOKIE_CALL
            {
                insn.set_src_reg(PSEUDO_KFUNC_CALL);
                insn.off = 0; // the kfunc lives in vmlinux, not in a module
                insn.imm = id as i32;
            }
        }
    }
    Ok(())
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

/// A program's function info as the kernel takes it (one record per function, offsets
/// strictly rising), or `None` for a program that calls no function of its own: the kernel
/// needs the records only for calls (global functions, `bpf_loop` callbacks), and the linker
/// can give two identical programs (the floor's empty ones) one body, whose two records
/// then share offset 0, which the kernel refuses.
fn calls_only(info: Vec<u8>, record: usize) -> Option<(Vec<u8>, u32)> {
    if record < 8 {
        return None;
    }
    let mut kept = Vec::with_capacity(info.len());
    let mut last: Option<u32> = None;
    for r in info.chunks_exact(record) {
        let offset = u32::from_ne_bytes([r[0], r[1], r[2], r[3]]);
        if last.is_none_or(|l| offset > l) {
            kept.extend_from_slice(r);
            last = Some(offset);
        }
    }
    let count = (kept.len() / record) as u32;
    (count > 1).then_some((kept, count))
}

/// A program's code as the kernel loads it: instructions, license, and its BTF (descriptor,
/// function info records, record size, record count).
struct Code<'a> {
    insns: &'a [bpf_insn],
    license: &'a CStr,
    btf: Option<(RawFd, Vec<u8>, usize, u32)>,
}

fn prog_load(
    name: &str,
    code: &Code,
    attach_type: bpf_attach_type,
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid bpf_attr (every unused field must be zero).
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    // SAFETY: writing plain integers into the union's prog_load member.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
    load.expected_attach_type = attach_type as u32;
    load.insns = code.insns.as_ptr() as u64;
    load.insn_cnt = code.insns.len() as u32;
    load.license = code.license.as_ptr() as u64;
    if let Some((fd, info, record, count)) = &code.btf
        && *count > 0
    {
        load.prog_btf_fd = *fd as u32;
        load.func_info = info.as_ptr() as u64;
        load.func_info_rec_size = *record as u32;
        load.func_info_cnt = *count;
    }
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

#[cfg(test)]
mod tests {
    use super::calls_only;

    fn records(offsets: &[u32]) -> Vec<u8> {
        offsets
            .iter()
            .flat_map(|&o| [o.to_ne_bytes(), 7u32.to_ne_bytes()].concat())
            .collect()
    }

    #[test]
    fn a_body_shared_by_two_programs_loads_without_function_info() {
        assert_eq!(calls_only(records(&[0, 0]), 8), None);
        assert_eq!(calls_only(records(&[0]), 8), None);
    }

    #[test]
    fn calls_keep_one_record_per_function() {
        assert_eq!(
            calls_only(records(&[0, 0, 40, 90]), 8),
            Some((records(&[0, 40, 90]), 3))
        );
    }
}
