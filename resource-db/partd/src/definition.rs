//! Partition definitions: what an operator asks for (`partctl create FILE`,
//! TOML on disk, JSON on the wire), how partd validates it, what it demands
//! from the resource database and the part-vmm descriptor built from it.

use std::path::Path;

pub use partvisor_api::definition::{Definition, Disk, Vsock, MAX_STOP_TIMEOUT_S};
use partvisor_api::descriptor::{
    DeviceConfig, SerialConfig, VmConfig, CMDLINE_MAX, MAX_DEVICES, MAX_XAPIC_VCPUS as MAX_VCPUS,
};
use resource_db::{Demand, DeviceKind, HostConfig, PartitionId};

/// part-vmm's command line limit, the NUL excluded.
const MAX_CMDLINE: usize = CMDLINE_MAX - 1;
/// Shared-pool share given to a partition that names neither `cpus` nor
/// `cpu_share`: a tenth of a CPU per vCPU.
pub const DEFAULT_SHARE_MILLI_PER_VCPU: u32 = 100;

/// Why a command line's `{mac:...}` or `{cid:...}` could not be filled in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("cmdline: {0:?} is not of the form {{mac:NAME}}, {{mac:NAME:INDEX}} or {{cid:NAME}}")]
    Malformed(String),
    #[error("cmdline: {{mac:{0}:{1}}}: no such partition or it has no NIC {1}")]
    NoMac(String, usize),
    #[error("cmdline: {{cid:{0}}}: no such partition, or it is not running with a [vsock] section (start it first)")]
    NoCid(String),
}

/// A placeholder in a command line, filled in at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placeholder<'a> {
    /// `{mac:NAME[:I]}`: the MAC of partition NAME's NIC I (granted at create).
    Mac(&'a str, usize),
    /// `{cid:NAME}`: the vsock CID partition NAME holds (granted at start).
    Cid(&'a str),
}

/// Why a definition was refused; each message names the key.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("definition is not valid: {0}")]
    Parse(#[source] serde_json::Error),
    #[error(transparent)]
    Name(#[from] resource_db::ParseError),
    #[error("vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("memory_mib 0: a partition needs at least 1 MiB")]
    Memory,
    #[error("{key} {path}: must be an absolute path (partctl resolves relative paths against the definition file's folder)")]
    RelativePath { key: &'static str, path: String },
    #[error("owner_uid is set by partd (the uid that creates the partition); leave it out")]
    OwnerGiven,
    #[error("cmdline: {0}")]
    Cmdline(&'static str),
    #[error("cpus: host CPU {0} is not managed by partd (managed: {1:?})")]
    UnknownCpu(u32, Vec<u32>),
    #[error("cpus: host CPU {0} is listed twice")]
    DuplicateCpu(u32),
    #[error("give either cpus (dedicated) or cpu_share (shared pool), not both")]
    CpusAndShare,
    #[error(
        "cpu_share {0}: must be a number of CPUs greater than 0 and at most vcpus ({1}), e.g. 0.5"
    )]
    Share(f64, u32),
    #[error("stop_timeout_s {0}: must be between 1 and {MAX_STOP_TIMEOUT_S}")]
    StopTimeout(u64),
    #[error("disk {0}: not a disk image partd manages (known: {1:?}); images are listed with `partd --disk-image PATH` when its resources.db is created")]
    UnknownDisk(String, Vec<String>),
    #[error("disk {0}: listed twice")]
    DuplicateDisk(String),
    #[error("nic switch {0:?}: a switch name is 1-32 characters a-z, 0-9 and '-'")]
    SwitchName(String),
    #[error("vsock accept: {from:?} port {port}: {why}")]
    VsockAccept {
        from: String,
        port: u32,
        why: &'static str,
    },
    #[error("vsock accept: {from:?} lists no ports; name the ports it may connect to")]
    VsockNoPorts { from: String },
    #[error("disk + nic + vsock: at most {MAX_DEVICES} devices per partition, got {0}")]
    TooManyDevices(usize),
}

/// uids a partition holds from create to destroy: its monitor's, then its
/// disk backend's.
pub const PARTITION_UIDS: u32 = 2;

/// What partd does with a [`Definition`]: check it against this host, and
/// derive what it demands from the resource database and the part-vmm
/// descriptor from it.
pub trait DefinitionExt: Sized {
    /// Parses and validates a JSON definition against the host.
    fn from_json(value: serde_json::Value, host: &HostConfig) -> Result<Self, DefinitionError>;
    /// The validated partition name.
    fn id(&self) -> Result<PartitionId, DefinitionError>;
    /// Shared-pool share in milli-CPUs (0 for a partition with dedicated CPUs).
    fn share_milli(&self) -> u32;
    /// What starting this partition takes from the resource database.
    fn demand(&self) -> Demand;
    /// The command line with every placeholder `p` replaced by `value(p)`.
    fn expand_cmdline(
        &self,
        value: impl Fn(Placeholder<'_>) -> Option<String>,
    ) -> Result<String, CmdlineError>;
    /// What creating this partition takes: one MAC per NIC.
    fn nic_demand(&self) -> Demand;
    /// The part-vmm descriptor: exactly what was granted. `affinity` is the
    /// set of host CPUs the vCPU threads may run on; `devices` the vhost-user
    /// sockets of its disks and NICs, in definition order.
    fn descriptor(
        &self,
        console: &Path,
        affinity: Vec<u32>,
        devices: Vec<DeviceConfig>,
    ) -> VmConfig;
}

impl DefinitionExt for Definition {
    /// Parses and validates a JSON definition against the host.
    fn from_json(value: serde_json::Value, host: &HostConfig) -> Result<Self, DefinitionError> {
        let def: Definition = serde_json::from_value(value).map_err(DefinitionError::Parse)?;
        validate(&def, host)?;
        Ok(def)
    }

    /// The validated partition name.
    fn id(&self) -> Result<PartitionId, DefinitionError> {
        Ok(PartitionId::new(&self.name)?)
    }

    /// Shared-pool share in milli-CPUs (0 for a partition with dedicated CPUs).
    fn share_milli(&self) -> u32 {
        if !self.cpus.is_empty() {
            return 0;
        }
        match self.cpu_share {
            // Validated: 0 < share <= vcpus <= 254, so this fits.
            Some(s) => ((s * 1000.0).round() as u32).max(1),
            None => DEFAULT_SHARE_MILLI_PER_VCPU.saturating_mul(self.vcpus),
        }
    }

    /// What starting this partition takes from the resource database.
    fn demand(&self) -> Demand {
        Demand {
            memory_mib: self.memory_mib,
            dedicated_cpus: self.cpus.clone(),
            cpu_share_milli: self.share_milli(),
            devices: self.disk.iter().map(Disk::device_name).collect(),
            vsock_cids: u32::from(self.vsock.is_some()),
            // MACs are granted at create and kept until destroy (see
            // `nic_demand`), so a switch knows every member's MAC.
            ..Demand::default()
        }
    }

    /// The command line with every placeholder `p` replaced by `value(p)`.
    fn expand_cmdline(
        &self,
        value: impl Fn(Placeholder<'_>) -> Option<String>,
    ) -> Result<String, CmdlineError> {
        let mut out = String::with_capacity(self.cmdline.len());
        let mut rest = self.cmdline.as_str();
        while let Some(at) = rest.find('{') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            let Some(kind) = ["{mac:", "{cid:"].into_iter().find(|k| tail.starts_with(k)) else {
                out.push('{');
                rest = &tail[1..];
                continue;
            };
            let after = &tail[kind.len()..];
            let Some(end) = after.find('}') else {
                return Err(CmdlineError::Malformed(tail.to_string()));
            };
            let inner = &after[..end];
            let malformed = || CmdlineError::Malformed(format!("{kind}{inner}}}"));
            let p = if kind == "{cid:" {
                Placeholder::Cid(inner)
            } else {
                match inner.split_once(':') {
                    Some((n, i)) => {
                        Placeholder::Mac(n, i.parse::<usize>().map_err(|_| malformed())?)
                    }
                    None => Placeholder::Mac(inner, 0),
                }
            };
            let (Placeholder::Mac(name, _) | Placeholder::Cid(name)) = p;
            if PartitionId::new(name).is_err() {
                return Err(malformed());
            }
            let v = value(p).ok_or_else(|| match p {
                Placeholder::Mac(n, i) => CmdlineError::NoMac(n.to_string(), i),
                Placeholder::Cid(n) => CmdlineError::NoCid(n.to_string()),
            })?;
            out.push_str(&v);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// What creating this partition takes: one MAC per NIC, and the uids
    /// its monitor and disk backend run as (a switch serves its port to
    /// one uid, known before the partition first starts).
    fn nic_demand(&self) -> Demand {
        Demand {
            macs: u32::try_from(self.nic.len()).unwrap_or(u32::MAX),
            uids: PARTITION_UIDS,
            ..Demand::default()
        }
    }

    /// The part-vmm descriptor: exactly what was granted. `affinity` is the
    /// set of host CPUs the vCPU threads may run on; `devices` the vhost-user
    /// sockets of its disks and NICs, in definition order.
    fn descriptor(
        &self,
        console: &Path,
        affinity: Vec<u32>,
        devices: Vec<DeviceConfig>,
    ) -> VmConfig {
        VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            serial: SerialConfig::Socket(console.to_owned()),
            stop_timeout_ms: self.stop_timeout_s.saturating_mul(1000),
            cpu_affinity: if affinity.is_empty() {
                None
            } else {
                Some(affinity.into_iter().map(|c| c as usize).collect())
            },
            devices,
        }
    }
}

/// Checks a definition against the host. Paths are only checked to be
/// absolute here: whether the caller may open them is for the create
/// request to find out, with the caller's rights (`crate::access`).
fn validate(def: &Definition, host: &HostConfig) -> Result<(), DefinitionError> {
    def.id()?;
    if def.vcpus == 0 || def.vcpus > MAX_VCPUS {
        return Err(DefinitionError::Vcpus(def.vcpus));
    }
    if def.memory_mib == 0 {
        return Err(DefinitionError::Memory);
    }
    check_absolute("kernel", &def.kernel)?;
    if let Some(initrd) = &def.initrd {
        check_absolute("initrd", initrd)?;
    }
    if def.cmdline.len() > MAX_CMDLINE {
        return Err(DefinitionError::Cmdline("longer than 65535 bytes"));
    }
    if def.cmdline.contains('\0') {
        return Err(DefinitionError::Cmdline("contains a NUL byte"));
    }
    for (i, cpu) in def.cpus.iter().enumerate() {
        if !host.cpus.contains(cpu) {
            return Err(DefinitionError::UnknownCpu(*cpu, host.cpus.clone()));
        }
        if def.cpus[..i].contains(cpu) {
            return Err(DefinitionError::DuplicateCpu(*cpu));
        }
    }
    if let Some(share) = def.cpu_share {
        if !def.cpus.is_empty() {
            return Err(DefinitionError::CpusAndShare);
        }
        if !share.is_finite() || share <= 0.0 || share > f64::from(def.vcpus) {
            return Err(DefinitionError::Share(share, def.vcpus));
        }
    }
    if def.stop_timeout_s == 0 || def.stop_timeout_s > MAX_STOP_TIMEOUT_S {
        return Err(DefinitionError::StopTimeout(def.stop_timeout_s));
    }
    if let Some(vsock) = &def.vsock {
        validate_vsock(vsock)?;
    }
    let n = def.disk.len() + def.nic.len() + usize::from(def.vsock.is_some());
    if n > MAX_DEVICES {
        return Err(DefinitionError::TooManyDevices(n));
    }
    let known: Vec<String> = host
        .devices
        .iter()
        .filter_map(|d| match &d.kind {
            DeviceKind::BackingFile(p) => Some(p.display().to_string()),
            DeviceKind::Tap(_) => None,
        })
        .collect();
    for (i, d) in def.disk.iter().enumerate() {
        check_absolute("disk image", &d.image)?;
        let name = d.device_name();
        if !known.contains(&name) {
            return Err(DefinitionError::UnknownDisk(name, known));
        }
        if def.disk[..i].iter().any(|o| o.image == d.image) {
            return Err(DefinitionError::DuplicateDisk(name));
        }
    }
    for nic in &def.nic {
        let ok = !nic.switch.is_empty()
            && nic.switch.len() <= 32
            && nic
                .switch
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(DefinitionError::SwitchName(nic.switch.clone()));
        }
    }
    Ok(())
}

/// Each `accept` entry names a valid partition and ports a guest can
/// listen on (`VMADDR_PORT_ANY`, u32::MAX, is never one), each port once.
fn validate_vsock(vsock: &Vsock) -> Result<(), DefinitionError> {
    for (i, a) in vsock.accept.iter().enumerate() {
        PartitionId::new(&a.from)?;
        if a.ports.is_empty() {
            return Err(DefinitionError::VsockNoPorts {
                from: a.from.clone(),
            });
        }
        for (j, &port) in a.ports.iter().enumerate() {
            let bad = |why| {
                Err(DefinitionError::VsockAccept {
                    from: a.from.clone(),
                    port,
                    why,
                })
            };
            if port == u32::MAX {
                return bad("is VMADDR_PORT_ANY, not a port");
            }
            let earlier = a.ports[..j].contains(&port)
                || vsock.accept[..i]
                    .iter()
                    .any(|o| o.from == a.from && o.ports.contains(&port));
            if earlier {
                return bad("is listed twice");
            }
        }
    }
    Ok(())
}

fn check_absolute(key: &'static str, path: &Path) -> Result<(), DefinitionError> {
    if !path.is_absolute() {
        return Err(DefinitionError::RelativePath {
            key,
            path: path.display().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn host() -> HostConfig {
        HostConfig {
            cpus: vec![0, 1],
            shared_pool_cpus: vec![0, 1],
            memory_budget_mib: 1024,
            devices: vec![resource_db::DeviceSpec {
                name: kernel(),
                kind: DeviceKind::BackingFile(kernel().into()),
            }],
            ..HostConfig::empty()
        }
    }

    fn kernel() -> String {
        // Any readable regular file will do for validation.
        std::env::current_exe().unwrap().display().to_string()
    }

    fn parse(extra: serde_json::Value) -> Result<Definition, DefinitionError> {
        let mut v = serde_json::json!({"name": "p1", "memory_mib": 32, "kernel": kernel()});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        Definition::from_json(v, &host())
    }

    #[test]
    fn minimal_definition_gets_defaults_and_a_share_per_vcpu() {
        let d = parse(serde_json::json!({"vcpus": 2})).unwrap();
        assert_eq!((d.vcpus, d.stop_timeout_s), (2, 10));
        assert_eq!(d.demand().cpu_share_milli, 200);
        assert_eq!(d.demand().memory_mib, 32);
        assert!(d.demand().dedicated_cpus.is_empty());
    }

    #[test]
    fn dedicated_cpus_become_demand_and_affinity() {
        let d = parse(serde_json::json!({"cpus": [1]})).unwrap();
        assert_eq!(d.demand().dedicated_cpus, vec![1]);
        assert_eq!(d.demand().cpu_share_milli, 0);
        let cfg = d.descriptor(Path::new("/s/console.sock"), vec![1], Vec::new());
        assert_eq!(cfg.cpu_affinity, Some(vec![1]));
        assert_eq!(
            cfg.serial,
            SerialConfig::Socket(PathBuf::from("/s/console.sock"))
        );
    }

    #[test]
    fn each_bad_key_is_named() {
        let cases = [
            (
                serde_json::json!({"name": "Bad Name"}),
                "invalid partition name",
            ),
            (serde_json::json!({"vcpus": 0}), "vcpus 0"),
            (serde_json::json!({"memory_mib": 0}), "memory_mib 0"),
            (serde_json::json!({"kernel": "rel/k"}), "absolute path"),
            (serde_json::json!({"initrd": "rel/i"}), "absolute path"),
            (serde_json::json!({"cpus": [7]}), "host CPU 7"),
            (serde_json::json!({"cpus": [1, 1]}), "listed twice"),
            (
                serde_json::json!({"cpus": [1], "cpu_share": 0.5}),
                "not both",
            ),
            (serde_json::json!({"cpu_share": 0.0}), "cpu_share 0"),
            (serde_json::json!({"cpu_share": 3.0}), "cpu_share 3"),
            (serde_json::json!({"stop_timeout_s": 0}), "stop_timeout_s 0"),
            (
                serde_json::json!({"memory_mb": 3}),
                "unknown field `memory_mb`",
            ),
            (serde_json::json!({"vcpus": "two"}), "invalid type"),
            (serde_json::json!({"cmdline": "a\u{0}b"}), "NUL"),
            (
                serde_json::json!({"vsock": {"accept": [{"from": "Web", "ports": [1]}]}}),
                "invalid partition name \"Web\"",
            ),
            (
                serde_json::json!({"vsock": {"accept": [{"from": "web", "ports": []}]}}),
                "vsock accept: \"web\" lists no ports",
            ),
            (
                serde_json::json!({"vsock": {"accept": [{"from": "web", "ports": [u32::MAX]}]}}),
                "port 4294967295: is VMADDR_PORT_ANY",
            ),
            (
                serde_json::json!({"vsock": {"accept": [
                    {"from": "web", "ports": [80]}, {"from": "web", "ports": [80]}]}}),
                "\"web\" port 80: is listed twice",
            ),
            (
                serde_json::json!({"vsock": {"allow": []}}),
                "unknown field `allow`",
            ),
        ];
        for (extra, want) in cases {
            let e = parse(extra.clone()).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn disks_demand_their_device_and_nics_demand_macs_at_create() {
        let d = parse(serde_json::json!({
            "disk": [{"image": kernel(), "read_only": true}],
            "nic": [{"switch": "lan"}, {"switch": "lan-2"}]
        }))
        .unwrap();
        assert_eq!(d.demand().devices, vec![kernel()]);
        assert_eq!(d.demand().macs, 0);
        assert_eq!(d.nic_demand().macs, 2);
        assert!(d.disk[0].read_only);
    }

    #[test]
    fn bad_disks_and_switch_names_are_named() {
        let cases = [
            (
                serde_json::json!({"disk": [{"image": "/proc/self/exe"}]}),
                "not a disk image partd manages",
            ),
            (
                serde_json::json!({"disk": [{"image": kernel()}, {"image": kernel()}]}),
                "listed twice",
            ),
            (
                serde_json::json!({"nic": [{"switch": "LAN"}]}),
                "nic switch \"LAN\"",
            ),
            (
                serde_json::json!({"nic": [{"switch": "a", "mac": "x"}]}),
                "unknown field `mac`",
            ),
            (
                serde_json::json!({"nic": vec![serde_json::json!({"switch": "a"}); 9]}),
                "at most 8 devices",
            ),
        ];
        for (extra, want) in cases {
            let e = parse(extra.clone()).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn mac_and_cid_placeholders_are_filled_in_and_bad_ones_named() {
        let lookup = |p: Placeholder<'_>| match p {
            Placeholder::Mac("b", 0) => Some("02:70:76:00:00:01".to_string()),
            Placeholder::Mac("b", 1) => Some("02:70:76:00:00:02".to_string()),
            Placeholder::Cid("b") => Some("7".to_string()),
            _ => None,
        };
        let with = |cmdline: &str| {
            let d = parse(serde_json::json!({ "cmdline": cmdline })).unwrap();
            d.expand_cmdline(lookup)
        };
        assert_eq!(
            with("net=send:{mac:b}:10:64 x={mac:b:1} stay").unwrap(),
            "net=send:02:70:76:00:00:01:10:64 x=02:70:76:00:00:02 stay"
        );
        assert_eq!(with("no placeholders {x}").unwrap(), "no placeholders {x}");
        assert_eq!(
            with("vsock=send:{cid:b}:80:1M {{mac:b}").unwrap(),
            "vsock=send:7:80:1M {02:70:76:00:00:01"
        );
        assert_eq!(
            with("{cid:c}").unwrap_err(),
            CmdlineError::NoCid("c".into())
        );
        assert!(matches!(with("{cid:b:1}"), Err(CmdlineError::Malformed(_))));
        assert_eq!(
            with("{mac:c}").unwrap_err(),
            CmdlineError::NoMac("c".into(), 0)
        );
        assert_eq!(
            with("{mac:b:2}").unwrap_err(),
            CmdlineError::NoMac("b".into(), 2)
        );
        assert!(matches!(with("{mac:b"), Err(CmdlineError::Malformed(_))));
        assert!(matches!(with("{mac:b:x}"), Err(CmdlineError::Malformed(_))));
        assert!(matches!(with("{mac:B}"), Err(CmdlineError::Malformed(_))));
    }

    #[test]
    fn a_vsock_section_demands_one_cid_and_accepts_only_what_it_lists() {
        let def = parse(serde_json::json!({"vsock": {"accept": [
            {"from": "web", "ports": [80, 443]}, {"from": "cron", "ports": [80]}]}}))
        .unwrap();
        assert_eq!(def.demand().vsock_cids, 1);
        let v = def.vsock.as_ref().unwrap();
        assert!(v.accepts("web", 443) && v.accepts("cron", 80));
        assert!(!v.accepts("cron", 443) && !v.accepts("db", 80));
        let none = parse(serde_json::json!({})).unwrap();
        assert_eq!(none.demand().vsock_cids, 0);
        assert!(!Vsock::default().accepts("web", 80), "default deny");
    }

    #[test]
    fn share_in_cpus_converts_to_milli() {
        let d = parse(serde_json::json!({"cpu_share": 0.25})).unwrap();
        assert_eq!(d.share_milli(), 250);
    }
}
