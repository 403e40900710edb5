//! Where to put an entry uprobe inside a function so the kernel can emulate the trapped
//! instruction instead of single-stepping it (≈13× cheaper per hit).
//!
//! x86-64 uprobes emulate `push`, `jmp`, `jcc`, `call` and `nop`; most other first
//! instructions are single-stepped out of line. glibc's `free` starts with
//! `test %rdi,%rdi; je <free(NULL) path>`: the `test` is single-stepped. Past the `je` the
//! pointer is still in `%rdi` and NULL frees never get there, so we probe the instruction
//! after the branch when it is an emulated `push`, else the branch itself. Anything we do not
//! recognise keeps offset 0, which is always correct, only slower. Other allocators' entry
//! points start in many ways (`cmp`, `mov`): [`first_emulated`] decodes them.

use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register};

/// Entry offset for a function whose first argument must still be in `%rdi` at the probe.
pub fn entry_offset_keeping_rdi(code: &[u8]) -> u64 {
    // test %rdi,%rdi
    if !code.starts_with(&[0x48, 0x85, 0xff]) {
        return 0;
    }
    let after_test = 3;
    let branch_len = match code.get(after_test..) {
        Some([0x74, _, ..]) => 2,                // je rel8
        Some([0x0f, 0x84, _, _, _, _, ..]) => 6, // je rel32
        _ => return 0,
    };
    let next = after_test + branch_len;
    if is_emulated_push(&code[next.min(code.len())..]) {
        next as u64
    } else {
        after_test as u64
    }
}

/// Entry offset for any function: the first instruction the kernel emulates, reached through
/// straight-line instructions that change nothing the probe reads (no memory written, no
/// branch, neither `%rsp`, `%rbp` nor a register in `keep` written). jemalloc's `malloc`
/// begins `cmp $0x1000,%rdi; ja …`: probed at the `ja`, its hit costs one emulated trap
/// instead of a single-step (redis under the empty-probe floor: 8.1 s → see the README).
/// 0 when no such instruction is found within the first few.
pub fn first_emulated(code: &[u8], keep: &[Register]) -> u64 {
    const LOOKED_AT: usize = 12;
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    for _ in 0..LOOKED_AT {
        if !decoder.can_decode() {
            break;
        }
        let instr = decoder.decode();
        let at = instr.ip() as usize;
        if instr.is_invalid() || at + instr.len() > code.len() {
            break;
        }
        if is_emulated(&code[at..]) {
            return at as u64;
        }
        if instr.flow_control() != FlowControl::Next
            || !changes_nothing_read(&mut factory, &instr, keep)
        {
            break;
        }
    }
    0
}

/// Whether running `instr` before the probe leaves what the probe reads as it was.
fn changes_nothing_read(
    factory: &mut InstructionInfoFactory,
    instr: &iced_x86::Instruction,
    keep: &[Register],
) -> bool {
    let writes = |access: OpAccess| {
        matches!(
            access,
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        )
    };
    let info = factory.info(instr);
    let memory = info.used_memory().iter().any(|m| writes(m.access()));
    let register = info.used_registers().iter().any(|r| {
        let full = r.register().full_register();
        writes(r.access())
            && (matches!(full, Register::RSP | Register::RBP) || keep.contains(&full))
    });
    !memory && !register
}

/// An instruction x86-64 uprobes emulate instead of single-stepping: `jcc`, `jmp`, `call`
/// (relative), `push %reg`, `nop`.
fn is_emulated(code: &[u8]) -> bool {
    matches!(
        code,
        [0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..] | [0xe8 | 0xe9 | 0xeb | 0x90, ..]
    ) || is_emulated_push(code)
}

/// `push %reg` (0x50–0x57), optionally with REX.B (0x41) for r8–r15.
fn is_emulated_push(code: &[u8]) -> bool {
    matches!(code, [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian12_glibc_free_probes_the_push_after_the_null_check() {
        // 48 85 ff  test %rdi,%rdi ; 0f 84 bf 00 00 00  je ; 55  push %rbp
        let code = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55, 0x48, 0x8d,
        ];
        assert_eq!(entry_offset_keeping_rdi(&code), 9);
    }

    #[test]
    fn short_branch_then_rex_push() {
        let code = [0x48, 0x85, 0xff, 0x74, 0x20, 0x41, 0x54];
        assert_eq!(entry_offset_keeping_rdi(&code), 5);
    }

    #[test]
    fn branch_without_push_probes_the_branch() {
        let code = [0x48, 0x85, 0xff, 0x74, 0x20, 0x48, 0x8b, 0x07];
        assert_eq!(entry_offset_keeping_rdi(&code), 3);
    }

    const ARGS: &[Register] = &[Register::RDI, Register::RSI];

    #[test]
    fn jemalloc_malloc_is_probed_at_the_branch_after_its_compare() {
        // cmp $0x1000,%rdi ; ja +0x93 ; lea …(%rip),%rdx
        let code = [
            0x48, 0x81, 0xff, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x87, 0x93, 0x00, 0x00, 0x00, 0x48,
            0x8d, 0x15, 0x5c, 0x7f, 0x2c, 0x00,
        ];
        assert_eq!(first_emulated(&code, ARGS), 7);
    }

    #[test]
    fn an_emulated_first_instruction_stays_at_zero() {
        assert_eq!(first_emulated(&[0x41, 0x54, 0x55, 0x53], ARGS), 0);
    }

    #[test]
    fn an_argument_written_first_keeps_zero() {
        // mov %rax,%rdi ; je
        assert_eq!(first_emulated(&[0x48, 0x89, 0xc7, 0x74, 0x10], ARGS), 0);
        // mov %rsp,%rbp ; je
        assert_eq!(first_emulated(&[0x48, 0x89, 0xe5, 0x74, 0x10], ARGS), 0);
        // mov %rdi,(%rax) ; je: a memory write
        assert_eq!(first_emulated(&[0x48, 0x89, 0x38, 0x74, 0x10], ARGS), 0);
    }

    #[test]
    fn scratch_registers_may_be_written_before_the_branch() {
        // mov %rdi,%rax ; shr $0x1a,%rax ; jne
        let code = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1a, 0x75, 0x10];
        assert_eq!(first_emulated(&code, ARGS), 7);
    }

    #[test]
    fn unknown_prologue_keeps_zero() {
        assert_eq!(entry_offset_keeping_rdi(&[0xf3, 0x0f, 0x1e, 0xfa]), 0);
        assert_eq!(entry_offset_keeping_rdi(&[0x41, 0x54, 0x55]), 0);
        assert_eq!(entry_offset_keeping_rdi(&[0x48, 0x85]), 0);
    }
}
