//! Where to put an entry uprobe inside a function so the kernel can emulate the trapped
//! instruction instead of single-stepping it (≈13× cheaper per hit).
//!
//! x86-64 uprobes emulate `push`, `jmp`, `jcc`, `call` and `nop`; most other first
//! instructions are single-stepped out of line. glibc's `free` starts with
//! `test %rdi,%rdi; je <free(NULL) path>`: the `test` is single-stepped. Past the `je` the
//! pointer is still in `%rdi` and NULL frees never get there, so we probe the instruction
//! after the branch when it is an emulated `push`, else the branch itself. Anything we do not
//! recognise keeps offset 0, which is always correct, only slower.

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

    #[test]
    fn unknown_prologue_keeps_zero() {
        assert_eq!(entry_offset_keeping_rdi(&[0xf3, 0x0f, 0x1e, 0xfa]), 0);
        assert_eq!(entry_offset_keeping_rdi(&[0x41, 0x54, 0x55]), 0);
        assert_eq!(entry_offset_keeping_rdi(&[0x48, 0x85]), 0);
    }
}
