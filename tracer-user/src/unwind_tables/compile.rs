//! One module's CFI → its compact unwind table ([`UnwindRow`]s sorted by address).
//!
//! Every FDE's rows are evaluated once here, with gimli, into the few rules the kernel can
//! apply (CFA from `rsp` or `rbp` plus an offset, `rbp` saved at the CFA plus an offset, the
//! PLT expression, the outermost frame). Anything else becomes a row that stops the kernel's
//! walk with a truncation mark, so an unusual rule can shorten a stack but never misname a
//! caller. Addresses no FDE covers get frame-pointer rows, as the copy unwinder treats them.

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, RegisterRule,
    UnwindContext, UnwindSection, UnwindTableRow, X86_64,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use tracer_common::unwind::{UnwindRow, cfa, rbp};

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// A module's table, and what building it found.
#[derive(Debug, Default)]
pub struct Compiled {
    pub rows: Vec<UnwindRow>,
    /// FDEs read.
    pub fdes: usize,
    /// Rows whose rule the kernel cannot apply (they end a stack, marked truncated).
    pub unsupported: usize,
    /// (virtual address, file offset, file size) of each executable loadable segment: how a
    /// mapping of the file translates to the table's addresses.
    pub segments: Vec<(u64, u64, u64)>,
}

/// The load bias of a mapping (`start`..`end` maps file offset `offset`, page-aligned, so
/// the segment it holds may begin after `offset` and share its first page with the one
/// before) of a file with executable `segments`; None for a mapping that cannot be (it ends
/// before it starts, or past the end of the address space).
pub fn bias(segments: &[(u64, u64, u64)], start: u64, end: u64, offset: u64) -> Option<u64> {
    let mapped = offset..offset.checked_add(end.checked_sub(start)?)?;
    segments
        .iter()
        .find(|&&(_, off, len)| off < mapped.end && off.saturating_add(len) > mapped.start)
        .map(|&(vaddr, off, _)| {
            start
                .wrapping_add(off)
                .wrapping_sub(offset)
                .wrapping_sub(vaddr)
        })
}

/// Virtual address minus file offset of the (first) executable segment of `segments`: how
/// an address in a mapping of the file, from its file offset, becomes the table's.
pub fn delta(segments: &[(u64, u64, u64)]) -> Option<u64> {
    let &(vaddr, offset, _) = segments.first()?;
    Some(vaddr.wrapping_sub(offset))
}

/// The executable segments of `file`: (virtual address, file offset, file size).
pub fn exec_segments(file: &object::File) -> Vec<(u64, u64, u64)> {
    file.segments()
        .filter(|seg| {
            matches!(seg.flags(), object::SegmentFlags::Elf { p_flags, .. }
                if p_flags.contains(object::elf::PF_X))
        })
        .map(|seg| {
            let (off, len) = seg.file_range();
            (seg.address(), off, len)
        })
        .collect()
}

/// Compiles the CFI of the ELF file `data` (a file without CFI gets one frame-pointer row);
/// `None` when it is no ELF file.
pub fn compile(data: &[u8]) -> Option<Compiled> {
    let file = object::File::parse(data).ok()?;
    let mut fdes = Vec::new();
    if let Some(section) = file.section_by_name(".eh_frame") {
        let bytes = section.data().ok()?;
        let mut bases = BaseAddresses::default().set_eh_frame(section.address());
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        if let Some(got) = file.section_by_name(".got") {
            bases = bases.set_got(got.address());
        }
        read_fdes(&EhFrame::new(bytes, LittleEndian), &bases, &mut fdes);
    }
    if fdes.is_empty()
        && let Some(section) = file.section_by_name(".debug_frame")
    {
        let bytes = section.data().ok()?;
        let mut frame = DebugFrame::new(bytes, LittleEndian);
        frame.set_address_size(8);
        read_fdes(&frame, &BaseAddresses::default(), &mut fdes);
    }
    let segments = exec_segments(&file);
    if fdes.is_empty() {
        // No CFI: every address is walked by frame pointers, which one row says.
        return Some(Compiled {
            rows: assemble(Vec::new()).rows,
            segments,
            ..Compiled::default()
        });
    }
    Some(Compiled {
        segments,
        ..assemble(fdes)
    })
}

/// One FDE's address range and its rows, before gaps are filled.
struct Fde {
    start: u64,
    end: u64,
    rows: Vec<(u64, UnwindRow)>,
}

fn read_fdes<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    out: &mut Vec<Fde>,
) {
    let mut context = UnwindContext::new();
    let mut entries = section.entries(bases);
    // A malformed entry ends the section's reading: what was read stays good.
    while let Ok(Some(entry)) = entries.next() {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            continue;
        };
        let (start, end) = (fde.initial_address(), fde.end_address());
        if start >= end || end > u64::from(u32::MAX) {
            continue;
        }
        let mut rows = Vec::new();
        let evaluated = fde
            .rows(section, bases, &mut context)
            .and_then(|mut table| {
                while let Some(row) = table.next_row()? {
                    rows.push((row.start_address(), rule_of(row, section)));
                }
                Ok(())
            });
        if evaluated.is_err() {
            // The range is known but its rules are not: stop there, never guess.
            rows = vec![(start, stop())];
        }
        out.push(Fde { start, end, rows });
    }
}

/// The kernel's rule for one CFI row.
fn rule_of<'a, S: UnwindSection<Slice<'a>>>(row: &UnwindTableRow<usize>, section: &S) -> UnwindRow {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => {
            return UnwindRow {
                cfa: cfa::END,
                ..UnwindRow::default()
            };
        }
        _ => return stop(),
    }
    let (kind, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(offset) = i32::try_from(*offset) else {
                return stop();
            };
            match *register {
                X86_64::RSP => (cfa::RSP, offset),
                X86_64::RBP => (cfa::RBP, offset),
                _ => return stop(),
            }
        }
        CfaRule::Expression(expression) => {
            let threshold = expression
                .get(section)
                .ok()
                .and_then(|e| plt_threshold(e.0.slice()));
            match threshold {
                Some(t) => (cfa::PLT, t),
                None => return stop(),
            }
        }
    };
    let (rbp_kind, rbp_offset) = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => (rbp::SAME, 0),
        Some(RegisterRule::Offset(at)) => match i32::try_from(at) {
            Ok(at) => (rbp::AT_CFA, at),
            Err(_) => return stop(),
        },
        Some(_) => return stop(),
    };
    UnwindRow {
        pc: 0,
        cfa_offset: offset,
        rbp_offset,
        cfa: kind,
        rbp: rbp_kind,
        _pad: 0,
    }
}

fn stop() -> UnwindRow {
    UnwindRow {
        cfa: cfa::UNSUPPORTED,
        ..UnwindRow::default()
    }
}

/// The expression every x86-64 PLT's CFI uses: `rsp + 8 + (((rip & 15) >= N) << 3)`, i.e.
/// one more word pushed once the stub is past its first push; `N` is returned.
fn plt_threshold(expr: &[u8]) -> Option<i32> {
    const BREG_RSP_8: [u8; 2] = [0x77, 0x08];
    const BREG_RIP_0_LIT15_AND: [u8; 4] = [0x80, 0x00, 0x3f, 0x1a];
    const GE_LIT3_SHL_PLUS: [u8; 4] = [0x2a, 0x33, 0x24, 0x22];
    let [a, b, c, d, e, f, lit, g, h, i, j] = expr.try_into().ok()?;
    let fits = [a, b] == BREG_RSP_8
        && [c, d, e, f] == BREG_RIP_0_LIT15_AND
        && [g, h, i, j] == GE_LIT3_SHL_PLUS
        && (0x30..=0x4f).contains(&lit);
    fits.then(|| i32::from(lit - 0x30))
}

/// Sorts the FDEs, fills the gaps between them with frame-pointer rows and merges rows that
/// repeat the rule before them.
fn assemble(mut fdes: Vec<Fde>) -> Compiled {
    fdes.sort_unstable_by_key(|f| f.start);
    let gap = UnwindRow {
        cfa: cfa::FRAME_POINTER,
        ..UnwindRow::default()
    };
    let mut out = Compiled {
        fdes: fdes.len(),
        ..Compiled::default()
    };
    let mut covered_to = 0u64;
    for fde in &fdes {
        if fde.start < covered_to {
            continue; // overlaps the one before: the first one read wins
        }
        if fde.start > covered_to {
            push(&mut out, covered_to, gap);
        }
        for &(pc, row) in &fde.rows {
            if pc >= fde.start && pc < fde.end {
                push(&mut out, pc, row);
            }
        }
        covered_to = fde.end;
    }
    push(&mut out, covered_to, gap);
    out.unsupported = out
        .rows
        .iter()
        .filter(|r| r.cfa == cfa::UNSUPPORTED)
        .count();
    out
}

fn push(out: &mut Compiled, pc: u64, mut row: UnwindRow) {
    row.pc = pc as u32;
    let same_rule = |last: &UnwindRow| {
        UnwindRow {
            pc: row.pc,
            ..*last
        } == row
    };
    match out.rows.last_mut() {
        Some(last) if last.pc == row.pc => *last = row,
        Some(last) if same_rule(last) => {}
        _ => out.rows.push(row),
    }
}

/// The row covering `pc` in a compiled table (what the kernel's search finds).
pub fn row_at(rows: &[UnwindRow], pc: u32) -> Option<&UnwindRow> {
    let i = rows.partition_point(|r| r.pc <= pc);
    i.checked_sub(1).map(|i| &rows[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(path: &str) -> Compiled {
        let data = std::fs::read(path).expect(path);
        compile(&data).expect(path)
    }

    /// glibc's `malloc` saves registers with pushes: its rows start at `rsp + 8` and grow by
    /// a word per push; and its PLT uses the PLT expression.
    #[test]
    fn libc_rows_follow_its_pushes() {
        let rows = compiled("/usr/lib/x86_64-linux-gnu/libc.so.6").rows;
        assert!(rows.len() > 1000, "{}", rows.len());
        assert!(rows.windows(2).all(|w| w[0].pc < w[1].pc));
        assert!(rows.iter().any(|r| r.cfa == cfa::PLT && r.cfa_offset == 11));
        assert!(rows.iter().any(|r| r.cfa == cfa::RSP && r.cfa_offset == 8));
        assert!(rows.iter().any(|r| r.cfa == cfa::RBP && r.cfa_offset == 16));
        assert!(
            rows.iter()
                .any(|r| r.rbp == rbp::AT_CFA && r.rbp_offset == -16)
        );
    }

    #[test]
    fn the_plt_expression_is_recognised_and_others_are_not() {
        let plt = [
            0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22,
        ];
        assert_eq!(plt_threshold(&plt), Some(11));
        let mut other = plt;
        other[8] = 0x34;
        assert_eq!(plt_threshold(&other), None);
        assert_eq!(plt_threshold(&plt[..10]), None);
    }

    /// Gaps between FDEs and the end of the last one unwind through frame pointers.
    #[test]
    fn gaps_get_frame_pointer_rows() {
        let row = |cfa_offset| UnwindRow {
            cfa_offset,
            ..UnwindRow::default()
        };
        let fdes = vec![
            Fde {
                start: 0x2000,
                end: 0x2010,
                rows: vec![(0x2000, row(8)), (0x2001, row(16))],
            },
            Fde {
                start: 0x1000,
                end: 0x1008,
                rows: vec![(0x1000, row(8))],
            },
        ];
        let rows = assemble(fdes).rows;
        let kinds: Vec<(u32, u8, i32)> = rows.iter().map(|r| (r.pc, r.cfa, r.cfa_offset)).collect();
        assert_eq!(
            kinds,
            [
                (0, cfa::FRAME_POINTER, 0),
                (0x1000, cfa::RSP, 8),
                (0x1008, cfa::FRAME_POINTER, 0),
                (0x2000, cfa::RSP, 8),
                (0x2001, cfa::RSP, 16),
                (0x2010, cfa::FRAME_POINTER, 0),
            ]
        );
        assert_eq!(row_at(&rows, 0x2005).map(|r| r.cfa_offset), Some(16));
    }
}
