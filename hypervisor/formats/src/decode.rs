//! What the hypervisor needs to know about a guest instruction when the CPU does not say it:
//! the guest-virtual to guest-physical walk of 4-level paging (Intel SDM Vol. 3A 4.5, AMD
//! APM Vol. 2 5.3) and the length of an instruction with its legacy and REX prefixes (SDM
//! Vol. 2A 2.1-2.2). Used for SVM without next-RIP save, where `66 0f 01 d9` is a VMMCALL
//! of 4 bytes, not 3.

/// Longest x86 instruction (SDM Vol. 2A 2.3.11).
pub const MAX_INSTRUCTION: usize = 15;

const PRESENT: u64 = 1 << 0;
const PAGE_SIZE: u64 = 1 << 7;
/// Physical-address bits 51:12 of a paging entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Translates guest-virtual `va` through the 4-level tables at `cr3`, reading each 8-byte
/// entry with `read_entry(guest_physical)`; None where an entry is missing or unreadable.
/// Permissions are not checked: the CPU just fetched from `va`.
pub fn translate(cr3: u64, va: u64, read_entry: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    let mut table = cr3 & ADDR;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let entry = read_entry(table + ((va >> shift) & 0x1ff) * 8)?;
        if entry & PRESENT == 0 {
            return None;
        }
        // 1 GiB (level 2) and 2 MiB (level 1) pages; PS is reserved in the PML4.
        let large = (level == 1 || level == 2) && entry & PAGE_SIZE != 0;
        if large || level == 0 {
            let offset_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR & !offset_mask) | (va & offset_mask));
        }
        table = entry & ADDR;
    }
    None
}

/// The length of the instruction in `bytes` if, after legacy prefixes and at most one REX
/// prefix, it is `opcode`; None if it is something else or longer than 15 bytes.
pub fn length_of(bytes: &[u8], opcode: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < bytes.len() && is_legacy_prefix(bytes[i]) {
        i += 1;
    }
    if i < bytes.len() && (0x40..=0x4f).contains(&bytes[i]) {
        i += 1;
    }
    let end = i + opcode.len();
    (end <= MAX_INSTRUCTION && bytes.get(i..end) == Some(opcode)).then_some(end)
}

fn is_legacy_prefix(b: u8) -> bool {
    matches!(b, 0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x66 | 0x67)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

    #[test]
    fn plain_and_prefixed_lengths() {
        assert_eq!(length_of(&[0x0f, 0x01, 0xd9, 0x90], &VMMCALL), Some(3));
        assert_eq!(length_of(&[0x66, 0x0f, 0x01, 0xd9], &VMMCALL), Some(4));
        assert_eq!(length_of(&[0xf3, 0x66, 0x48, 0x0f, 0x01, 0xd9], &VMMCALL), Some(6));
        assert_eq!(length_of(&[0xf4], &[0xf4]), Some(1));
        assert_eq!(length_of(&[0x2e, 0x0f, 0xa2], &[0x0f, 0xa2]), Some(3));
    }

    #[test]
    fn other_instructions_and_overlong_forms_are_refused() {
        assert_eq!(length_of(&[0x0f, 0x01, 0xd8], &VMMCALL), None); // VMRUN
        assert_eq!(length_of(&[0x48, 0x48, 0x0f, 0x01, 0xd9], &VMMCALL), None); // two REX
        assert_eq!(length_of(&[0x0f, 0x01], &VMMCALL), None); // cut short
        let mut long = [0x66u8; 16];
        long[12..15].copy_from_slice(&VMMCALL);
        assert_eq!(length_of(&long, &VMMCALL), Some(15));
        let mut too_long = [0x66u8; 16];
        too_long[13..16].copy_from_slice(&VMMCALL);
        assert_eq!(length_of(&too_long, &VMMCALL), None);
    }

    /// A guest address space of 8-byte entries keyed by guest-physical address.
    fn space(entries: &[(u64, u64)]) -> HashMap<u64, u64> {
        entries.iter().copied().collect()
    }

    #[test]
    fn walks_4k_2m_and_1g_pages() {
        let m = space(&[
            (0x1000, 0x2000 | 3),               // PML4[0] -> PDPT
            (0x2000, 0x4000_0000 | 0x83),       // PDPT[0]: 1 GiB page at 1 GiB
            (0x2008, 0x3000 | 3),               // PDPT[1] -> PD
            (0x3000, 0x0060_0000 | 0x83),       // PD[0]: 2 MiB page at 6 MiB
            (0x3008, 0x5000 | 3),               // PD[1] -> PT
            (0x5000 + 3 * 8, 0x0077_7000 | 3),  // PT[3]: 4 KiB page
        ]);
        let read = |pa| m.get(&pa).copied();
        assert_eq!(translate(0x1000, 0x1234_5678, read), Some(0x4000_0000 + 0x1234_5678));
        assert_eq!(translate(0x1000, 0x4000_0000 + 0x1_2345, read), Some(0x0060_0000 + 0x1_2345));
        assert_eq!(translate(0x1000, 0x4020_3abc, read), Some(0x0077_7abc));
        assert_eq!(translate(0x1000, 0x4020_4000, read), None); // PT[4] missing
        assert_eq!(translate(0x1000, 1 << 39, read), None); // PML4[1] missing
    }

    #[test]
    fn not_present_entries_stop_the_walk() {
        let m = space(&[(0x1000, 0x2000 | 2), (0x2000, 0x83)]);
        assert_eq!(translate(0x1000, 0x10, |pa| m.get(&pa).copied()), None);
    }
}
