//! Field offsets in the running kernel's structures, read from its BTF
//! (`/sys/kernel/btf/vmlinux`), for the eBPF side's reads of kernel memory: a thread's
//! pending uprobe returns (see `tracer_common::return_walk`) and its thread pointer.
//!
//! Only struct members are needed, so this reads the type section directly rather than
//! building a whole type graph: one pass over the types, a few hundred microseconds.

use std::collections::HashMap;

use tracer_common::return_walk;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

/// BTF kinds, as numbered by the format.
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// What the eBPF side needs to know of this kernel's structures.
#[derive(Clone, Copy, Debug)]
pub struct KernelOffsets {
    /// The `RETURN_WALK` offsets, or all zero (so sessions carry nothing) when the BTF is
    /// missing or its structures are not the ones expected.
    pub return_walk: [u32; return_walk::LEN],
    /// `task_struct.thread.fsbase`, or 0 (so no malloc is predicted).
    pub task_fsbase: u32,
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
        ],
    )
    .unwrap_or_default();
    let member = |s: &str, m: &str| structs.get(s)?.members.get(m).copied();
    KernelOffsets {
        return_walk: return_walk_in(&structs).unwrap_or([0; return_walk::LEN]),
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

/// A struct's size and its named members' byte offsets.
struct Layout {
    size: u32,
    members: HashMap<String, u32>,
}

/// The first struct of each `wanted` name (the kernel's own; modules have separate BTF).
fn structs(btf: &[u8], wanted: &[&str]) -> Option<HashMap<String, Layout>> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(btf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?));
    if u16_at(0)? != MAGIC {
        return None; // absent, or big-endian: not a kernel this tool runs on
    }
    let header = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let str_off = u32_at(16)? as usize;
    let types = header + type_off;
    let strings = header + str_off;
    let name = |offset: u32| {
        let start = strings + offset as usize;
        let bytes = btf.get(start..)?;
        let end = bytes.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&bytes[..end]).ok()
    };
    let mut found = HashMap::new();
    let mut at = types;
    while at < types + type_len && found.len() < wanted.len() {
        let (name_off, info, size) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let bitfields = info >> 31 == 1;
        let trailing = match kind {
            1 | 14 | 17 => 4,             // int, var, decl tag
            3 => 12,                      // array
            4 | 5 | 15 | 19 => vlen * 12, // struct, union, datasec, enum64
            6 | 13 => vlen * 8,           // enum, function prototype
            _ => 0,
        };
        let body = at + 12;
        if kind == KIND_STRUCT || kind == KIND_UNION {
            let struct_name = name(name_off)?;
            if kind == KIND_STRUCT
                && wanted.contains(&struct_name)
                && !found.contains_key(struct_name)
            {
                let mut members = HashMap::new();
                for i in 0..vlen {
                    let m = body + i * 12;
                    let bits = u32_at(m + 8)?;
                    let bit_offset = if bitfields { bits & 0xff_ffff } else { bits };
                    if let Some(member) = name(u32_at(m)?).filter(|n| !n.is_empty()) {
                        members.insert(member.to_owned(), bit_offset / 8);
                    }
                }
                found.insert(struct_name.to_owned(), Layout { size, members });
            }
        }
        at = body + trailing;
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The thread pointer sits inside `task_struct.thread`, near the struct's end.
    #[test]
    fn this_kernel_has_the_thread_pointer() {
        let off = offsets().task_fsbase;
        assert!(off > 1000, "{off}");
    }
}
