//! Ring-buffer record → wire [`Event`] plus its payload. Pure; unit-tested on bytes.

use tracer_common::{Event, EventKind, StackRegs, flags};

use crate::{
    model::{ExecLayout, Op, Recording, StackId},
    procfs::FileKey,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event ({need} bytes)")]
    Short { len: usize, need: usize },
    #[error("record announces {payload} payload bytes but carries {have}")]
    Payload { payload: usize, have: usize },
    #[error("unknown event kind {0}")]
    Kind(u16),
}

const EVENT_BYTES: usize = size_of::<Event>();

/// Splits a record into its fixed event and the payload bytes that follow it.
pub fn record(bytes: &[u8]) -> Result<(Event, &[u8]), DecodeError> {
    if bytes.len() < EVENT_BYTES {
        return Err(DecodeError::Short {
            len: bytes.len(),
            need: EVENT_BYTES,
        });
    }
    // SAFETY: length checked; `Event` is plain old data; the read tolerates any alignment.
    let event: Event = unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() };
    let payload = event.payload_len as usize;
    let rest = &bytes[EVENT_BYTES..];
    if rest.len() < payload {
        return Err(DecodeError::Payload {
            payload,
            have: rest.len(),
        });
    }
    Ok((event, &rest[..payload]))
}

/// Instruction pointers carried inline (a stack's first sighting), innermost first.
pub fn inline_frames(payload: &[u8], out: &mut Vec<u64>) {
    out.clear();
    let (words, _) = payload.as_chunks::<8>();
    out.extend(
        words
            .iter()
            .map(|w| u64::from_ne_bytes(*w))
            .take_while(|&ip| ip != 0),
    );
}

/// The file name an `Exec` record carries, up to its NUL.
pub fn exec_name<'p>(event: &Event, payload: &'p [u8]) -> Option<&'p [u8]> {
    if event.flags & flags::FILE_NAME == 0 {
        return None;
    }
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    (end > 0).then(|| &payload[..end])
}

/// The caller's registers and the copied stack bytes of a `STACK_COPY` record.
pub fn copied_stack<'p>(event: &Event, payload: &'p [u8]) -> Option<(StackRegs, &'p [u8])> {
    if event.flags & flags::STACK_COPY == 0 {
        return None;
    }
    let (head, stack) = payload.split_first_chunk::<{ size_of::<StackRegs>() }>()?;
    let word = |i: usize| u64::from_ne_bytes(head[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    let regs = StackRegs {
        ip: word(0),
        sp: word(1),
        bp: word(2),
    };
    Some((regs, stack))
}

/// Whether the event's frames travel in its payload rather than in the stack map.
pub fn has_inline_stack(event: &Event) -> bool {
    event.flags & flags::STACK_INLINE != 0
}

/// The model operation an event stands for, given its resolved stack.
pub fn op(event: &Event, stack: StackId) -> Result<Op, DecodeError> {
    let kind = EventKind::from_raw(event.kind).ok_or(DecodeError::Kind(event.kind))?;
    Ok(match kind {
        EventKind::Free => Op::Free { addr: event.addr },
        EventKind::Realloc | EventKind::ReallocArray => Op::Realloc {
            old: event.old_addr,
            new: event.addr,
            size: event.size,
            stack,
            recording: recording(event.flags),
        },
        EventKind::Malloc
        | EventKind::Calloc
        | EventKind::PosixMemalign
        | EventKind::AlignedAlloc
        | EventKind::Valloc
        | EventKind::Pvalloc => Op::Alloc {
            addr: event.addr,
            size: event.size,
            stack,
            recording: recording(event.flags),
        },
        EventKind::Mmap => Op::Map {
            addr: event.addr,
            len: event.size,
            prot: (event.aux >> 32) as u32,
            flags: event.aux as u32,
            fd: i64::from(event.old_addr as i32),
            inside_allocator: event.flags & flags::INSIDE_ALLOCATOR != 0,
        },
        EventKind::Munmap => Op::Unmap {
            addr: event.addr,
            len: event.size,
        },
        EventKind::Mremap => Op::Remap {
            old: event.old_addr,
            old_len: event.aux,
            new: event.addr,
            new_len: event.size,
            inside_allocator: event.flags & flags::INSIDE_ALLOCATOR != 0,
        },
        EventKind::Brk => Op::Brk { addr: event.addr },
        EventKind::MapCaller => Op::MapCaller {
            addr: event.addr,
            stack,
            caller_in_allocator: false,
        },
        EventKind::Fork => Op::Fork {
            child: event.addr as u32,
            traced: event.size != 0,
        },
        EventKind::Exec => Op::Exec {
            layout: (event.old_addr != 0).then(|| ExecLayout {
                exe: file_key(event.aux as u32, event.old_addr),
                phdr: event.addr,
                interp_base: event.size,
            }),
        },
        EventKind::Exit => Op::Exit { traps: event.size },
        EventKind::MapFile => Op::MapFile {
            addr: event.addr,
            len: event.size,
            offset: (event.aux & 0xffff_ffff) << 12,
            file: file_key((event.aux >> 32) as u32, event.old_addr),
        },
    })
}

/// A file's key from the kernel's encoding of its device and its inode: the device as `stat`
/// reports it, so it matches what `/proc` shows of the same file.
fn file_key(kernel_dev: u32, ino: u64) -> (u64, u64) {
    let key = FileKey::from_kernel(kernel_dev, ino);
    (key.dev, key.ino)
}

/// How the kernel chose to record an allocation, from its flags.
fn recording(bits: u16) -> Recording {
    match (bits & flags::SAMPLED != 0, bits & flags::UNTRACKED != 0) {
        (false, _) if bits & flags::PREDICTED != 0 => Recording::Predicted,
        (false, _) => Recording::Every,
        (true, false) => Recording::Sampled,
        (true, true) => Recording::SampledUntracked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(event: &Event, payload: &[u64]) -> Vec<u8> {
        // SAFETY: viewing a POD struct as bytes.
        let raw = unsafe {
            std::slice::from_raw_parts((event as *const Event).cast::<u8>(), EVENT_BYTES)
        };
        let mut out = raw.to_vec();
        for ip in payload {
            out.extend_from_slice(&ip.to_ne_bytes());
        }
        out
    }

    #[test]
    fn decodes_a_malloc() {
        let ev = Event {
            ts_ns: 5,
            addr: 0x1000,
            size: 64,
            tgid: 7,
            tid: 8,
            kind: EventKind::Malloc as u16,
            stack: 3,
            ..Event::default()
        };
        let bytes = bytes_of(&ev, &[]);
        let (got, payload) = record(&bytes).expect("decodes");
        assert_eq!(got, ev);
        assert!(payload.is_empty());
        assert_eq!(
            op(&got, StackId(9)),
            Ok(Op::Alloc {
                addr: 0x1000,
                size: 64,
                stack: StackId(9),
                recording: Recording::Every,
            })
        );
    }

    #[test]
    fn decodes_inline_frames_up_to_the_first_zero() {
        let ev = Event {
            kind: EventKind::Realloc as u16,
            flags: flags::STACK_INLINE,
            payload_len: 32,
            old_addr: 0x10,
            addr: 0x20,
            size: 3,
            ..Event::default()
        };
        let bytes = bytes_of(&ev, &[0xaa, 0xbb, 0, 0]);
        let (got, payload) = record(&bytes).expect("decodes");
        assert!(has_inline_stack(&got));
        let mut frames = Vec::new();
        inline_frames(payload, &mut frames);
        assert_eq!(frames, [0xaa, 0xbb]);
        assert_eq!(
            op(&got, StackId(1)),
            Ok(Op::Realloc {
                old: 0x10,
                new: 0x20,
                size: 3,
                stack: StackId(1),
                recording: Recording::Every,
            })
        );
    }

    #[test]
    fn decodes_a_copied_stack() {
        let ev = Event {
            kind: EventKind::Malloc as u16,
            flags: flags::STACK_COPY,
            payload_len: 40,
            ..Event::default()
        };
        let bytes = bytes_of(&ev, &[0x401000, 0x7ffc_0000, 0x7ffc_0100, 7, 9]);
        let (got, payload) = record(&bytes).expect("decodes");
        let (regs, stack) = copied_stack(&got, payload).expect("a copied stack");
        assert_eq!(
            regs,
            StackRegs {
                ip: 0x401000,
                sp: 0x7ffc_0000,
                bp: 0x7ffc_0100
            }
        );
        assert_eq!(stack.len(), 16);
        assert_eq!(stack[0], 7);
        let plain = Event::default();
        assert!(copied_stack(&plain, payload).is_none());
    }

    #[test]
    fn rejects_truncated_and_unknown_records() {
        assert!(matches!(record(&[0u8; 10]), Err(DecodeError::Short { .. })));
        let ev = Event {
            payload_len: 64,
            ..Event::default()
        };
        assert!(matches!(
            record(&bytes_of(&ev, &[1])),
            Err(DecodeError::Payload { .. })
        ));
        let unknown = Event {
            kind: 999,
            ..Event::default()
        };
        assert_eq!(op(&unknown, StackId(0)), Err(DecodeError::Kind(999)));
    }
}
