//! Two network namespaces joined by a veth pair: the "other host" of the
//! multi-host tests, on this one machine (needs root and iproute2's `ip`).

/// Two network namespaces joined by a veth pair, removed on drop.
pub struct Netns {
    pub a: String,
    pub b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Netns {
    pub fn create() -> Result<(Netns, String, String), String> {
        let id = std::process::id() % 10000;
        let ns = Netns {
            a: format!("ic-a-{id}"),
            b: format!("ic-b-{id}"),
        };
        let (va, vb) = (format!("icva{id}"), format!("icvb{id}"));
        let net = 1 + (id % 250);
        let (ipa, ipb) = (format!("10.201.{net}.1"), format!("10.201.{net}.2"));
        // Leftovers of a crashed run with the same pid would make `add` fail.
        let _ = ip(&["netns", "del", &ns.a]);
        let _ = ip(&["netns", "del", &ns.b]);
        let _ = ip(&["link", "del", &va]);
        ip(&["netns", "add", &ns.a])?;
        ip(&["netns", "add", &ns.b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &ns.a])?;
        ip(&["link", "set", &vb, "netns", &ns.b])?;
        for (n, v, addr) in [(&ns.a, &va, &ipa), (&ns.b, &vb, &ipb)] {
            ip(&["-n", n, "addr", "add", &format!("{addr}/24"), "dev", v])?;
            ip(&["-n", n, "link", "set", v, "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        Ok((ns, ipa, ipb))
    }

    pub fn rx_bytes(&self) -> u64 {
        let id = std::process::id() % 10000;
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.a,
                "cat",
                &format!("/sys/class/net/icva{id}/statistics/rx_bytes"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}
