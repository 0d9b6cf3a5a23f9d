//! I/O partitions of a partition: starting them before its monitor (boot
//! order), and letting go of them after it. (Guest sockets: [`super::vsock`].)

use super::*;

impl Coordinator {
    pub(super) fn blk_record_path(&self, id: &PartitionId) -> PathBuf {
        self.files(id).dir.join("blk.json")
    }

    /// Refuses a start whose sockets would not fit a Unix socket address.
    pub(super) fn check_socket_paths(
        &self,
        id: &PartitionId,
        def: &Definition,
    ) -> Result<(), CoordError> {
        let files = self.files(id);
        let mut sockets: Vec<PathBuf> = (0..def.disk.len()).map(|i| files.disk_socket(i)).collect();
        for (i, nic) in def.nic.iter().enumerate() {
            let sf = SwitchFiles::new(&self.settings.state_dir, &nic.switch);
            sockets.push(sf.port_socket(id.as_str(), i));
            sockets.push(sf.stats());
        }
        if def.vsock.is_some() {
            let vf = VsockFiles::new(&self.settings.state_dir);
            sockets.push(vf.port_socket(id.as_str()));
            sockets.push(vf.control());
            // Guest -> host connections reach `<host socket>_<port>`.
            let mut host = vf.host_socket(id.as_str()).into_os_string();
            host.push("_4294967294");
            sockets.push(host.into());
        }
        if let Some(long) = sockets
            .iter()
            .find(|s| s.as_os_str().len() > io::MAX_SOCKET_PATH)
        {
            return Err(CoordError::SocketPathTooLong {
                id: id.clone(),
                path: long.clone(),
                max: io::MAX_SOCKET_PATH,
            });
        }
        Ok(())
    }

    /// Starts the partition's `part-io blk` and makes sure every switch it
    /// has a NIC on runs with a port for it; returns its devices, disks
    /// first, in definition order.
    /// The disk images are the ones `boot` holds (opened with the starting
    /// caller's rights): part-io gets them as inherited descriptors and
    /// their `/proc/self/fd/N` names, never a path of partd's choosing.
    pub(super) async fn start_io(
        &self,
        id: &PartitionId,
        def: &Definition,
        boot: &super::owner::BootFiles,
    ) -> Result<Vec<DeviceConfig>, CoordError> {
        let files = self.files(id);
        let ids = self.identities(id)?;
        let mut devices = Vec::new();
        if !def.disk.is_empty() {
            self.own(&files.disks_dir(), ids.disks, ids.disks, 0o711)?;
            let sockets: Vec<PathBuf> = (0..def.disk.len()).map(|i| files.disk_socket(i)).collect();
            let mut disks: Vec<(PathBuf, bool)> = Vec::new();
            let mut inherit = Vec::new();
            let mut largest = 0u64;
            for (i, (d, f)) in def.disk.iter().zip(&boot.disks).enumerate() {
                let target = io::FIRST_DISK_FD + i as i32;
                inherit.push((std::os::fd::AsRawFd::as_raw_fd(f), target));
                disks.push((format!("/proc/self/fd/{target}").into(), d.read_only));
                largest = largest.max(f.metadata().map_or(0, |m| m.len()));
            }
            let args = io::blk_args(&disks, &sockets, id.as_str(), def.memory_mib, ids.monitor);
            let jail = self.io_jail(id, ids.disks, &[files.disks_dir()], 1024, largest)?;
            let rec = io::spawn_ready(
                &self.settings.part_io,
                &format!("blk of {id}"),
                &args,
                &files.dir.join("blk.log"),
                sockets.len(),
                inherit,
                jail,
            )
            .await
            .map_err(|source| CoordError::Backend {
                id: id.clone(),
                source,
            })?;
            for s in &sockets {
                self.hand_over(s, ids.monitor, ids.monitor, 0o600)?;
            }
            tracing::info!(
                "{id}: part-io blk pid {} serves {} disk(s)",
                rec.pid,
                sockets.len()
            );
            if let Err(e) = process::write_json_atomic(&self.blk_record_path(id), &rec) {
                tracing::warn!("{id}: cannot record part-io blk pid {}: {e}", rec.pid);
            }
            devices.extend(
                sockets
                    .into_iter()
                    .map(|socket| DeviceConfig::VhostUserBlk { socket }),
            );
        }
        let mut switches: Vec<&str> = def.nic.iter().map(|n| n.switch.as_str()).collect();
        switches.dedup();
        for sw in switches {
            self.ensure_switch(sw, id).await?;
        }
        for (i, nic) in def.nic.iter().enumerate() {
            let sf = SwitchFiles::new(&self.settings.state_dir, &nic.switch);
            devices.push(DeviceConfig::VhostUserNet {
                socket: sf.port_socket(id.as_str(), i),
            });
        }
        devices.extend(self.start_vsock(id, def).await?);
        Ok(devices)
    }

    /// Every port `switch` must have: one per NIC on it of every defined
    /// partition, with the MAC granted to that partition at create.
    pub(super) fn members(&self, switch: &str) -> Result<Vec<Port>, CoordError> {
        let sf = SwitchFiles::new(&self.settings.state_dir, switch);
        let mut ports = Vec::new();
        for rec in self.db.view().partitions()? {
            let Ok(def) = serde_json::from_str::<Definition>(&rec.definition) else {
                continue;
            };
            let macs = self.db.holdings(&rec.id)?.macs;
            for (i, nic) in def.nic.iter().enumerate() {
                if nic.switch != switch {
                    continue;
                }
                let Some(mac) = macs.get(i) else {
                    return Err(CoordError::NoMac {
                        id: rec.id.clone(),
                        nic: i,
                    });
                };
                ports.push(Port {
                    partition: rec.id.to_string(),
                    socket: sf.port_socket(rec.id.as_str(), i),
                    mac: mac.to_string(),
                    memory_mib: Some(def.memory_mib),
                    frontend_uid: Some(self.identities(&rec.id)?.monitor),
                });
            }
        }
        Ok(ports)
    }

    /// Starts switch `switch` with every member's port, unless it already
    /// runs with `id`'s ports. A running switch without them is restarted
    /// only while no member is connected.
    pub(super) async fn ensure_switch(
        &self,
        switch: &str,
        id: &PartitionId,
    ) -> Result<(), CoordError> {
        let _g = self.switches.lock().await;
        let sf = SwitchFiles::new(&self.settings.state_dir, switch);
        std::fs::create_dir_all(&sf.dir).map_err(|source| CoordError::SwitchDir {
            path: sf.dir.clone(),
            source,
        })?;
        let io_uid = self.io_uid();
        self.own(&sf.run_dir(), io_uid, io_uid, 0o711)?;
        let want = self.members(switch)?;
        let mine: Vec<&Port> = want.iter().filter(|p| p.partition == id.as_str()).collect();
        if let Some(rec) = process::read_json::<IoRecord>(&sf.record()).filter(IoRecord::alive) {
            if mine.iter().all(|p| rec.ports.contains(p)) {
                return Ok(());
            }
            let conns = io::port_connections(&sf.stats()).await.unwrap_or_default();
            let busy: Vec<&str> = rec
                .ports
                .iter()
                .filter(|p| conns.iter().any(|(s, c)| *c && s == &p.socket))
                .map(|p| p.partition.as_str())
                .collect();
            if !busy.is_empty() {
                return Err(CoordError::SwitchBusy {
                    id: id.clone(),
                    switch: switch.to_owned(),
                    pid: rec.pid,
                    busy: busy.into_iter().map(str::to_owned).collect(),
                });
            }
            tracing::info!(
                "switch {switch}: restarting part-io pid {} to add ports for {id}",
                rec.pid
            );
            if !rec.stop(Duration::from_secs(5)).await {
                return Err(CoordError::SwitchStuck {
                    switch: switch.to_owned(),
                    pid: rec.pid,
                });
            }
        }
        let args = io::net_args(&want, &sf.stats());
        let jail = self.io_jail(id, io_uid, &[sf.run_dir()], 8192, 0)?;
        let mut rec = io::spawn_ready(
            &self.settings.part_io,
            &format!("net switch {switch}"),
            &args,
            &sf.log(),
            want.len(),
            Vec::new(),
            jail,
        )
        .await
        .map_err(|source| CoordError::Backend {
            id: id.clone(),
            source,
        })?;
        for p in &want {
            let uid = p.frontend_uid.unwrap_or(self.settings.own_uid);
            self.hand_over(&p.socket, uid, uid, 0o600)?;
        }
        tracing::info!(
            "switch {switch}: part-io net pid {} with {} port(s)",
            rec.pid,
            want.len()
        );
        rec.ports = want;
        if let Err(e) = process::write_json_atomic(&sf.record(), &rec) {
            tracing::warn!(
                "switch {switch}: cannot record part-io pid {}: {e}",
                rec.pid
            );
        }
        Ok(())
    }

    /// Waits until no backend maps `id`'s memory any more: its `part-io
    /// blk` has exited (partd stops it) and every switch port of it shows
    /// `connected: false` (or its switch is gone). It never gives up: until
    /// then the memory stays held (the partition stays `stopping`), and an
    /// error is logged every `UNMAP_DEADLINE` (DESIGN: a partition's memory
    /// is not reused while any backend still maps it).
    pub(super) async fn let_go(&self, id: &PartitionId, def: &Definition) {
        let blk = self.blk_record_path(id);
        if let Some(rec) = process::read_json::<IoRecord>(&blk) {
            let mut rounds = 0u64;
            while !rec.stop(io::UNMAP_DEADLINE).await {
                rounds += 1;
                tracing::error!(
                    "{id}: part-io blk pid {} has not ended after {} s; its memory stays held",
                    rec.pid,
                    rounds * io::UNMAP_DEADLINE.as_secs()
                );
            }
            tracing::info!("{id}: part-io blk pid {} has exited", rec.pid);
            let _ = std::fs::remove_file(&blk);
        }
        for (i, nic) in def.nic.iter().enumerate() {
            let sf = SwitchFiles::new(&self.settings.state_dir, &nic.switch);
            let socket = sf.port_socket(id.as_str(), i);
            let mut t0 = Instant::now();
            loop {
                let connected = match io::port_connections(&sf.stats()).await {
                    None => false,
                    Some(ports) => ports.iter().any(|(s, c)| *c && *s == socket),
                };
                if !connected {
                    tracing::info!(
                        "{id}: switch {} port {} disconnected",
                        nic.switch,
                        socket.display()
                    );
                    break;
                }
                if t0.elapsed() >= io::UNMAP_DEADLINE {
                    tracing::error!(
                        "{id}: switch {} still shows port {} connected after {} s; its memory stays held",
                        nic.switch,
                        socket.display(),
                        io::UNMAP_DEADLINE.as_secs()
                    );
                    t0 = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.stop_vsock(id, def).await;
        if !def.disk.is_empty() || !def.nic.is_empty() || def.vsock.is_some() {
            tracing::info!("{id}: every backend has unmapped its memory");
        }
    }

    /// The part-io processes of a partition, for `show`.
    pub(super) fn io_views(&self, rec: &PartitionRecord) -> Vec<IoView> {
        let mut out = Vec::new();
        let Ok(def) = serde_json::from_str::<Definition>(&rec.definition) else {
            return out;
        };
        let files = self.files(&rec.id);
        if let Some(r) = process::read_json::<IoRecord>(&self.blk_record_path(&rec.id)) {
            out.push(IoView {
                kind: IoKind::Blk,
                switch: None,
                pid: r.pid,
                start_time: r.start_time,
                alive: r.alive(),
                sockets: (0..def.disk.len()).map(|i| files.disk_socket(i)).collect(),
                log: files.dir.join("blk.log"),
            });
        }
        let mut switches: Vec<&str> = def.nic.iter().map(|n| n.switch.as_str()).collect();
        switches.sort_unstable();
        switches.dedup();
        for sw in switches {
            let sf = SwitchFiles::new(&self.settings.state_dir, sw);
            if let Some(r) = process::read_json::<IoRecord>(&sf.record()) {
                out.push(IoView {
                    kind: IoKind::Net,
                    switch: Some(sw.to_string()),
                    pid: r.pid,
                    start_time: r.start_time,
                    alive: r.alive(),
                    sockets: r
                        .ports
                        .iter()
                        .filter(|p| p.partition == rec.id.as_str())
                        .map(|p| p.socket.clone())
                        .collect(),
                    log: sf.log(),
                });
            }
        }
        out.extend(self.vsock_view(&rec.id, &def));
        out
    }
}
