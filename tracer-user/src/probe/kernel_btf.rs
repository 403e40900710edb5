//! Field offsets in the running kernel's structures, read from its BTF
//! (`/sys/kernel/btf/vmlinux`), for the eBPF side's reads of kernel memory: a thread's
//! pending uprobe returns (see `tracer_common::return_walk`) and its thread pointer.
//!
//! Only struct members are needed, so this reads the type section directly rather than
//! building a whole type graph: one pass over the types, a few hundred microseconds.

use std::collections::HashMap;

use tracer_common::{file_walk, return_walk};

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

/// BTF kinds, as numbered by the format.
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_FUNC: u32 = 12;

/// What the eBPF side needs to know of this kernel's structures.
#[derive(Clone, Copy, Debug)]
pub struct KernelOffsets {
    /// The `RETURN_WALK` offsets, or all zero (so sessions carry nothing) when the BTF is
    /// missing or its structures are not the ones expected.
    pub return_walk: [u32; return_walk::LEN],
    /// `task_struct.thread.fsbase`, or 0 (so no malloc is predicted).
    pub task_fsbase: u32,
    /// The `FILE_WALK` offsets, or all zero (then processes gone before the collector reads
    /// their mappings keep unsymbolized stacks).
    pub file_walk: [u32; file_walk::LEN],
    /// The BTF id of the `bpf_session_cookie` kfunc, which uprobe sessions need (found here,
    /// in the same read, rather than by a whole parse of the kernel's types: ≈35 ms).
    pub session_cookie: Option<u32>,
}

pub fn offsets() -> KernelOffsets {
    let btf = std::fs::read(VMLINUX_BTF).unwrap_or_default();
    let structs = structs(
        &btf,
        &[
            "task_struct",
            "thread_struct",
            "uprobe_task",
            "return_instance",
            "return_consumer",
            "mm_struct",
            "files_struct",
            "fdtable",
            "file",
            "inode",
            "super_block",
            "vm_area_struct",
        ],
    )
    .unwrap_or_default();
    let member = |s: &str, m: &str| structs.get(s)?.members.get(m).copied();
    let session_cookie = Types::parse(&btf).and_then(|t| t.function("bpf_session_cookie"));
    KernelOffsets {
        session_cookie,
        return_walk: return_walk_in(&structs).unwrap_or([0; return_walk::LEN]),
        file_walk: file_walk_in(&structs).unwrap_or([0; file_walk::LEN]),
        task_fsbase: member("task_struct", "thread")
            .zip(member("thread_struct", "fsbase"))
            .map_or(0, |(thread, fsbase)| thread + fsbase),
    }
}

fn return_walk_in(structs: &HashMap<String, Layout>) -> Option<[u32; return_walk::LEN]> {
    let member = |s: &str, m: &str| structs.get(s)?.members.get(m).copied();
    let mut out = [0u32; return_walk::LEN];
    out[return_walk::TASK_UTASK] = member("task_struct", "utask")?;
    out[return_walk::UTASK_RETURNS] = member("uprobe_task", "return_instances")?;
    out[return_walk::RETURN_NEXT] = member("return_instance", "next")?;
    out[return_walk::RETURN_CONSUMER_COUNT] = member("return_instance", "cons_cnt")?;
    out[return_walk::CONSUMER_COOKIE] = member("return_consumer", "cookie")?;
    out[return_walk::RETURN_FIRST_COOKIE] =
        member("return_instance", "consumer")? + out[return_walk::CONSUMER_COOKIE];
    out[return_walk::RETURN_EXTRA] = member("return_instance", "extra_consumers")?;
    out[return_walk::CONSUMER_SIZE] = structs.get("return_consumer")?.size;
    out[return_walk::FOUND] = 1;
    Some(out)
}

fn file_walk_in(structs: &HashMap<String, Layout>) -> Option<[u32; file_walk::LEN]> {
    let member = |s: &str, m: &str| structs.get(s)?.members.get(m).copied();
    let mut out = [0u32; file_walk::LEN];
    out[file_walk::TASK_MM] = member("task_struct", "mm")?;
    out[file_walk::MM_EXE_FILE] = member("mm_struct", "exe_file")?;
    out[file_walk::MM_SAVED_AUXV] = member("mm_struct", "saved_auxv")?;
    out[file_walk::TASK_FILES] = member("task_struct", "files")?;
    out[file_walk::FILES_FDT] = member("files_struct", "fdt")?;
    out[file_walk::FDT_MAX_FDS] = member("fdtable", "max_fds")?;
    out[file_walk::FDT_FD] = member("fdtable", "fd")?;
    out[file_walk::FILE_INODE] = member("file", "f_inode")?;
    out[file_walk::INODE_INO] = member("inode", "i_ino")?;
    out[file_walk::INODE_SB] = member("inode", "i_sb")?;
    out[file_walk::SB_DEV] = member("super_block", "s_dev")?;
    out[file_walk::VMA_START] = member("vm_area_struct", "vm_start")?;
    out[file_walk::VMA_PGOFF] = member("vm_area_struct", "vm_pgoff")?;
    out[file_walk::VMA_FILE] = member("vm_area_struct", "vm_file")?;
    out[file_walk::FOUND] = 1;
    Some(out)
}

/// A struct's size and its named members' byte offsets.
struct Layout {
    size: u32,
    members: HashMap<String, u32>,
}

/// The kernel's BTF type section, indexed by type id.
struct Types<'a> {
    btf: &'a [u8],
    strings: usize,
    /// Byte position of each type's record; index 0 is `void`.
    at: Vec<usize>,
}

impl<'a> Types<'a> {
    fn parse(btf: &'a [u8]) -> Option<Self> {
        let u16_at = |at: usize| Some(u16::from_le_bytes(btf.get(at..at + 2)?.try_into().ok()?));
        let u32_at = |at: usize| Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?));
        if u16_at(0)? != MAGIC {
            return None; // absent, or big-endian: not a kernel this tool runs on
        }
        let header = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let str_off = u32_at(16)? as usize;
        let types = header + type_off;
        let mut at = vec![0];
        let mut pos = types;
        while pos < types + type_len {
            at.push(pos);
            let info = u32_at(pos + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let trailing = match kind {
                1 | 14 | 17 => 4,             // int, var, decl tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => vlen * 12, // struct, union, datasec, enum64
                6 | 13 => vlen * 8,           // enum, function prototype
                _ => 0,
            };
            pos += 12 + trailing;
        }
        Some(Self {
            btf,
            strings: header + str_off,
            at,
        })
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.btf.get(at..at + 4)?.try_into().ok()?,
        ))
    }

    fn name(&self, offset: u32) -> Option<&'a str> {
        let start = self.strings + offset as usize;
        let bytes = self.btf.get(start..)?;
        let end = bytes.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&bytes[..end]).ok()
    }

    /// The id of the function named `wanted`.
    fn function(&self, wanted: &str) -> Option<u32> {
        (1..self.at.len())
            .find(|&id| {
                self.header(id).is_some_and(|(kind, ..)| kind == KIND_FUNC)
                    && self.u32_at(self.at[id]).and_then(|name| self.name(name)) == Some(wanted)
            })
            .map(|id| id as u32)
    }

    /// (kind, vlen, has bitfields, size) of type `id`.
    fn header(&self, id: usize) -> Option<(u32, usize, bool, u32)> {
        let at = *self.at.get(id)?;
        let info = self.u32_at(at + 4)?;
        Some((
            (info >> 24) & 0x1f,
            (info & 0xffff) as usize,
            info >> 31 == 1,
            self.u32_at(at + 8)?,
        ))
    }

    /// The named members of struct or union `id`, those of its anonymous struct and union
    /// members included (`mm_struct` keeps everything in one), at `base` + their offsets.
    fn members(&self, id: usize, base: u32, out: &mut HashMap<String, u32>, depth: u32) {
        let Some((kind, vlen, bitfields, _)) = self.header(id) else {
            return;
        };
        if depth > 4 || (kind != KIND_STRUCT && kind != KIND_UNION) {
            return;
        }
        let body = self.at[id] + 12;
        for i in 0..vlen {
            let m = body + i * 12;
            let (Some(name), Some(ty), Some(bits)) =
                (self.u32_at(m), self.u32_at(m + 4), self.u32_at(m + 8))
            else {
                return;
            };
            let bit_offset = if bitfields { bits & 0xff_ffff } else { bits };
            let offset = base + bit_offset / 8;
            match self.name(name) {
                Some("") => self.members(ty as usize, offset, out, depth + 1),
                Some(member) => {
                    out.entry(member.to_owned()).or_insert(offset);
                }
                None => {}
            }
        }
    }
}

/// The first struct of each `wanted` name (the kernel's own; modules have separate BTF).
fn structs(btf: &[u8], wanted: &[&str]) -> Option<HashMap<String, Layout>> {
    let types = Types::parse(btf)?;
    let mut found = HashMap::new();
    for id in 1..types.at.len() {
        if found.len() == wanted.len() {
            break;
        }
        let (kind, _, _, size) = types.header(id)?;
        if kind != KIND_STRUCT {
            continue;
        }
        let name = types.name(types.u32_at(types.at[id])?)?;
        if wanted.contains(&name) && !found.contains_key(name) {
            let mut members = HashMap::new();
            types.members(id, 0, &mut members, 0);
            found.insert(name.to_owned(), Layout { size, members });
        }
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WANTED: &[&str] = &["task_struct", "uprobe_task", "file", "inode"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Hostile input (issue 18): random bytes are not BTF, and never a panic.
        #[test]
        fn random_bytes_are_not_btf(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = structs(&bytes, WANTED);
        }

        /// The kernel's own BTF with its header and first types overwritten: an answer or
        /// none, never a panic or a read past the data.
        #[test]
        fn the_kernel_btf_with_bytes_overwritten_never_panics(
            edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..16),
        ) {
            let Ok(mut btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
                return Ok(());
            };
            for (at, byte) in edits {
                if let Some(b) = btf.get_mut(at) {
                    *b = byte;
                }
            }
            let _ = structs(&btf, WANTED);
        }
    }

    /// Every machine this runs on (and CI) has BTF: the walk's offsets are all found, and
    /// agree with the layout `bpftool btf dump` shows (a consumer is a cookie, then an id).
    #[test]
    fn this_kernel_has_the_walk() {
        let off = offsets().return_walk;
        assert_eq!(off[return_walk::FOUND], 1, "{off:?}");
        assert_eq!(off[return_walk::CONSUMER_SIZE], 16);
        assert_eq!(off[return_walk::CONSUMER_COOKIE], 0);
        assert!(off[return_walk::RETURN_EXTRA] > off[return_walk::RETURN_FIRST_COOKIE]);
    }

    /// The file walk is found, through `mm_struct`'s anonymous inner struct, and agrees with
    /// `pahole`'s layout where it is fixed (`fdtable` starts with `max_fds`, then `fd`).
    #[test]
    fn this_kernel_has_the_file_walk() {
        let off = offsets().file_walk;
        assert_eq!(off[file_walk::FOUND], 1, "{off:?}");
        assert_eq!(off[file_walk::FDT_MAX_FDS], 0);
        assert_eq!(off[file_walk::FDT_FD], 8);
        assert!(
            off[file_walk::MM_SAVED_AUXV] > off[file_walk::MM_EXE_FILE]
                || off[file_walk::MM_EXE_FILE] > 0
        );
    }

    /// The session kfunc's id is the one aya's whole parse of the same BTF gives.
    #[test]
    fn the_session_cookie_kfunc_is_found_as_aya_finds_it() {
        let btf = aya_obj::btf::Btf::from_sys_fs().expect("this machine has BTF");
        let kind = aya_obj::btf::BtfKind::Func;
        let id = btf
            .id_by_type_name_kind("bpf_session_cookie", kind)
            .unwrap();
        assert_eq!(offsets().session_cookie, Some(id));
    }

    /// The thread pointer sits inside `task_struct.thread`, near the struct's end.
    #[test]
    fn this_kernel_has_the_thread_pointer() {
        let off = offsets().task_fsbase;
        assert!(off > 1000, "{off}");
    }
}
