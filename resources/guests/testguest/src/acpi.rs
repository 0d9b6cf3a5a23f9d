//! Just enough ACPI: RSDP -> XSDT (or RSDT) -> MADT (CPUs, IOAPIC) and FADT
//! (hardware-reduced sleep control register).

use crate::arch::read_bytes;

/// Most IOAPICs the guest keeps track of.
pub const MAX_IOAPICS: usize = 4;

/// What the guest learns from the ACPI tables.
pub struct Platform {
    /// APIC ids of enabled processors, in MADT order.
    pub apic_ids: [u32; crate::arch::MAX_CPUS],
    /// How many enabled LAPIC entries the MADT has (may exceed `apic_ids`).
    pub cpus: usize,
    /// LAPIC base from the MADT header.
    pub lapic: u64,
    /// First IOAPIC's base, if any.
    pub ioapic: Option<u64>,
    /// Every MADT IOAPIC (up to [`MAX_IOAPICS`]): (base, first GSI).
    pub ioapics: [(u64, u32); MAX_IOAPICS],
    /// How many entries of `ioapics` are valid.
    pub nr_ioapics: usize,
    /// FADT SLEEP_CONTROL_REG, when it is an I/O port.
    pub sleep_port: Option<u16>,
}

fn u32_at(addr: u64) -> u32 {
    u32::from_le_bytes(read_bytes::<4>(addr))
}

fn u64_at(addr: u64) -> u64 {
    u64::from_le_bytes(read_bytes::<8>(addr))
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(read_bytes::<1>(addr + i)[0])) == 0
}

/// Find the RSDP: the start info's pointer, else scan 0xE0000..0x100000.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && read_bytes::<8>(hint) == *b"RSD PTR " {
        return Some(hint);
    }
    (0xE0000u64..0x100000)
        .step_by(16)
        .find(|&a| read_bytes::<8>(a) == *b"RSD PTR " && checksum_ok(a, 20))
}

/// Walk the tables from the RSDP at `rsdp`.
pub fn parse(rsdp: u64) -> Platform {
    let mut p = Platform {
        apic_ids: [0; crate::arch::MAX_CPUS],
        cpus: 0,
        lapic: crate::drivers::lapic::LAPIC_DEFAULT,
        ioapic: None,
        ioapics: [(0, 0); MAX_IOAPICS],
        nr_ioapics: 0,
        sleep_port: None,
    };
    let revision = read_bytes::<1>(rsdp + 15)[0];
    let xsdt = if revision >= 2 { u64_at(rsdp + 24) } else { 0 };
    let (root, entry_size) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(u32_at(rsdp + 16)), 4)
    };
    if root == 0 {
        return p;
    }
    let len = u64::from(u32_at(root + 4));
    let mut e = root + 36;
    while e + entry_size <= root + len {
        let table = if entry_size == 8 {
            u64_at(e)
        } else {
            u64::from(u32_at(e))
        };
        e += entry_size;
        match &read_bytes::<4>(table) {
            b"APIC" => parse_madt(table, &mut p),
            b"FACP" => parse_fadt(table, &mut p),
            _ => {}
        }
    }
    p
}

fn parse_madt(madt: u64, p: &mut Platform) {
    let len = u64::from(u32_at(madt + 4));
    p.lapic = u64::from(u32_at(madt + 36));
    let mut e = madt + 44;
    while e + 2 <= madt + len {
        let [kind, elen] = read_bytes::<2>(e);
        if elen < 2 {
            break;
        }
        match kind {
            0 if elen >= 8 => {
                let apic_id = read_bytes::<1>(e + 3)[0];
                if u32_at(e + 4) & 1 != 0 {
                    if p.cpus < p.apic_ids.len() {
                        p.apic_ids[p.cpus] = u32::from(apic_id);
                    }
                    p.cpus += 1;
                }
            }
            1 if elen >= 12 => {
                let base = u64::from(u32_at(e + 4));
                p.ioapic.get_or_insert(base);
                if p.nr_ioapics < MAX_IOAPICS {
                    p.ioapics[p.nr_ioapics] = (base, u32_at(e + 8));
                    p.nr_ioapics += 1;
                }
            }
            _ => {}
        }
        e += u64::from(elen);
    }
}

fn parse_fadt(fadt: u64, p: &mut Platform) {
    let len = u32_at(fadt + 4);
    // SLEEP_CONTROL_REG: Generic Address Structure at offset 244 (ACPI 5+).
    if len >= 256 {
        let [space, ..] = read_bytes::<4>(fadt + 244);
        let addr = u64_at(fadt + 248);
        if space == 1 && addr != 0 && addr <= 0xFFFF {
            p.sleep_port = Some(addr as u16);
        }
    }
}
