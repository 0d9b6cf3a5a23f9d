//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) built with `acpi_tables` and
//! written into the reserved block below 1 MiB.
//!
//! The platform is hardware-reduced ACPI: the FADT points at a sleep control
//! register (soft-off) and an ACPI reset register (the i8042 command port);
//! the DSDT describes COM1, a power button and the GED that raises it.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::error::{Error, Result};
use crate::layout;

const OEM_ID: [u8; 6] = *b"PARTVS";
const OEM_REVISION: u32 = 1;

/// MADT Interrupt Source Override (type 2): ISA IRQ 0 (PIT) is GSI 2.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

/// MADT Local APIC NMI (type 4): LINT1 of every processor is NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

macro_rules! raw_madt_entry {
    ($t:ty) => {
        impl Aml for $t {
            fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
                sink.vec(self.as_bytes());
            }
        }
    };
}
raw_madt_entry!(InterruptSourceOverride);
raw_madt_entry!(LocalApicNmi);

fn table_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT's definition block body. Each AML object borrows its children,
/// so every top-level object is built and serialised in one statement.
fn dsdt_body(virtio: &[(u64, u32)]) -> Vec<u8> {
    let mut sb = Vec::new();
    for (i, (base, gsi)) in virtio.iter().enumerate() {
        // Linux's virtio_mmio driver matches ACPI id LNRO0005.
        let name = format!("VR{i:02X}");
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u8)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(
                            true,
                            *base as u32,
                            layout::VIRTIO_MMIO_SIZE as u32,
                        ),
                        &aml::Interrupt::new(true, true, false, false, *gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut sb);
    }
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(
                        layout::SERIAL_PORT,
                        layout::SERIAL_PORT,
                        1,
                        layout::SERIAL_PORT_LEN as u8,
                    ),
                    &aml::Interrupt::new(true, true, false, false, layout::SERIAL_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut sb);
    let ged_base = layout::GED_MMIO as u32;
    let ged_len = layout::GED_MMIO_SIZE as u32;
    let power_bit = layout::GED_EVENT_POWER_BUTTON;
    aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, ged_base, ged_len),
                    &aml::Interrupt::new(true, true, false, false, layout::GED_GSI),
                ]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemMemory,
                &ged_base,
                &ged_len,
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GDAT", 32)],
            ),
            // _EVT(gsi): Local0 = GDAT (read clears); if the power-button
            // bit is set, Notify(\_SB_.PWRB, 0x80).
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("GDAT")),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(&aml::Local(1), &aml::Local(0), &power_bit),
                            &power_bit,
                        ),
                        vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    let mut body = aml::Scope::raw("\\_SB_".into(), sb);
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![
            &layout::S5_SLEEP_TYPE,
            &aml::ZERO,
            &aml::ZERO,
            &aml::ZERO,
        ]),
    )
    .to_aml_bytes(&mut body);
    body
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"PVFACP  ", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    b.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::SLEEP_CONTROL_PORT),
    );
    b.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::SLEEP_STATUS_PORT),
    );
    b.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::I8042_COMMAND_PORT),
    );
    b.reset_value = 0xfe;
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"PARTVSOR").into();
    table_bytes(&b.finalize())
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"PVMADT  ",
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_MMIO),
    );
    for id in 0..vcpus {
        // vcpus <= 254 (config::MAX_XAPIC_VCPUS), so the id fits a byte.
        let id = id as u8;
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, layout::IOAPIC_MMIO, 0));
    m.add_structure(InterruptSourceOverride {
        kind: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    m.add_structure(LocalApicNmi {
        kind: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    table_bytes(&m)
}

/// Addresses of the tables as placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiPlacement {
    pub rsdp: u64,
    pub dsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub xsdt: u64,
    pub end: u64,
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Builds the tables for `vcpus` processors and the virtio-mmio transports
/// `virtio` (window base, GSI), and writes them from `layout::ACPI_START`.
/// Returns where each landed (the RSDP is what the boot protocols hand to
/// the guest).
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u32,
    virtio: &[(u64, u32)],
) -> Result<AcpiPlacement> {
    let rsdp_addr = layout::ACPI_START;
    let dsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"PVDSDT  ", OEM_REVISION);
    dsdt.append_slice(&dsdt_body(virtio));
    let dsdt = dsdt.as_slice().to_vec();
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut x = XSDT::new(OEM_ID, *b"PVXSDT  ", OEM_REVISION);
    x.add_entry(fadt_addr);
    x.add_entry(madt_addr);
    let xsdt = table_bytes(&x);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(Error::AcpiTooLarge {
            need: end - layout::ACPI_START,
            reserved: layout::ACPI_END - layout::ACPI_START,
        });
    }
    let rsdp = table_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(Error::write("an ACPI table"))?;
    }
    Ok(AcpiPlacement {
        rsdp: rsdp_addr,
        dsdt: dsdt_addr,
        fadt: fadt_addr,
        madt: madt_addr,
        xsdt: xsdt_addr,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let hdr = read(mem, addr, 8);
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        read(mem, addr, len)
    }

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums_and_one_lapic_per_vcpu() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let p = write_tables(&mem, 3, &[(0xd000_0000, 16)]).unwrap();
        let rsdp = read(&mem, p.rsdp, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(sums_to_zero(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, vec![p.fadt, p.madt]);
        let fadt = table(&mem, p.fadt);
        assert_eq!(&fadt[0..4], b"FACP");
        assert!(sums_to_zero(&fadt));
        // X_DSDT at offset 140, HW_REDUCED flag (bit 20) at offset 112.
        assert_eq!(
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
            p.dsdt
        );
        assert_ne!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
        // SLEEP_CONTROL_REG GAS at offset 244: I/O space, port 0x3c0.
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            0x3c0
        );
        let madt = table(&mem, p.madt);
        assert_eq!(&madt[0..4], b"APIC");
        assert!(sums_to_zero(&madt));
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapics = 0;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            if kind == 0 {
                lapics.push(madt[off + 3]);
            } else if kind == 1 {
                ioapics += 1;
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![0, 1, 2]);
        assert_eq!(ioapics, 1);
        let dsdt = table(&mem, p.dsdt);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert!(sums_to_zero(&dsdt));
        for name in [
            &b"COM1"[..],
            b"PWRB",
            b"GED_",
            b"_EVT",
            b"_S5_",
            b"ACPI0013",
        ] {
            assert!(dsdt.windows(name.len()).any(|w| w == name));
        }
        assert!(p.end <= layout::ACPI_END);
    }
}
