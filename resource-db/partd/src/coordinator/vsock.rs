//! Guest sockets of a partition: the host's one `part-io vsock`, the
//! partition's directory entry in it (added before its monitor starts,
//! removed after it), and the CID it was granted in the start transaction.

use partvisor_api::vsock::{Entry, Location, Request};

use super::*;

impl Coordinator {
    /// The CID `id` holds (granted by the start transaction).
    fn granted_cid(&self, id: &PartitionId) -> Result<u32, CoordError> {
        self.db
            .holdings(id)?
            .vsock_cids
            .first()
            .copied()
            .ok_or_else(|| CoordError::NoCid { id: id.clone() })
    }

    /// The hybrid host socket of `id`: host processes connect here and
    /// write `CONNECT <port>`; the guest reaches host listeners at
    /// `<this>_<port>`.
    pub(super) fn vsock_host_socket(&self, id: &PartitionId) -> PathBuf {
        VsockFiles::new(&self.settings.state_dir).host_socket(id.as_str())
    }

    /// Makes `id`'s hybrid host directory: its owner's host processes and
    /// the relay (its group; the directory is setgid, so listeners made
    /// there are the relay's group) meet there and nobody else enters.
    /// Returns (owner uid, relay gid).
    pub(super) fn own_vsock_host_dir(
        &self,
        id: &PartitionId,
        def: &Definition,
    ) -> Result<(u32, u32), CoordError> {
        let owner = def.owner_uid.unwrap_or(0);
        let io_gid = self.io_uid();
        let vf = VsockFiles::new(&self.settings.state_dir);
        self.own(&vf.hosts_dir(), 0, 0, 0o755)?;
        if let Some(dir) = vf.host_socket(id.as_str()).parent() {
            self.own(dir, owner, io_gid, 0o2770)?;
        }
        Ok((owner, io_gid))
    }

    /// Makes sure the relay runs, adds `id`'s entry (policy from its
    /// definition) and returns its device.
    pub(super) async fn start_vsock(
        &self,
        id: &PartitionId,
        def: &Definition,
    ) -> Result<Option<DeviceConfig>, CoordError> {
        let Some(vsock) = &def.vsock else {
            return Ok(None);
        };
        let cid = self.granted_cid(id)?;
        let vf = self.ensure_vsock(id).await?;
        let socket = vf.port_socket(id.as_str());
        let host_socket = vf.host_socket(id.as_str());
        let monitor = self.identities(id)?.monitor;
        let (owner, io_gid) = self.own_vsock_host_dir(id, def)?;
        let entry = Entry {
            cid,
            partition: id.to_string(),
            socket: Some(socket.clone()),
            host_socket: Some(host_socket.clone()),
            location: Location::Local,
            memory_mib: Some(def.memory_mib),
            frontend_uid: Some(monitor),
            accept: vsock.accept.clone(),
        };
        io::vsock_request(&vf.control(), &Request::Add(entry))
            .await
            .map_err(|source| CoordError::Vsock {
                id: id.clone(),
                source,
            })?;
        self.hand_over(&socket, monitor, monitor, 0o600)?;
        self.hand_over(&host_socket, owner, io_gid, 0o660)?;
        tracing::info!("{id}: vsock CID {cid} on {}", socket.display());
        Ok(Some(DeviceConfig::VhostUserVsock {
            socket,
            guest_cid: cid,
        }))
    }

    /// Starts the host's vsock relay unless it runs; returns its files.
    async fn ensure_vsock(&self, id: &PartitionId) -> Result<VsockFiles, CoordError> {
        let _g = self.vsock.lock().await;
        let vf = VsockFiles::new(&self.settings.state_dir);
        if process::read_json::<IoRecord>(&vf.record()).is_some_and(|r| r.alive()) {
            return Ok(vf);
        }
        std::fs::create_dir_all(&vf.dir).map_err(|source| CoordError::SwitchDir {
            path: vf.dir.clone(),
            source,
        })?;
        let io_uid = self.io_uid();
        self.own(&vf.run_dir(), io_uid, io_uid, 0o711)?;
        self.own(&vf.hosts_dir(), 0, 0, 0o755)?;
        let jail = self.io_jail(id, io_uid, &[vf.run_dir(), vf.hosts_dir()], 8192, 0)?;
        let rec = io::spawn_ready(
            &self.settings.part_io,
            "vsock",
            &io::vsock_args(&vf),
            &vf.log(),
            1,
            Vec::new(),
            jail,
        )
        .await
        .map_err(|source| CoordError::Backend {
            id: id.clone(),
            source,
        })?;
        tracing::info!("part-io vsock pid {} serves guest sockets", rec.pid);
        if let Err(e) = process::write_json_atomic(&vf.record(), &rec) {
            tracing::warn!("cannot record part-io vsock pid {}: {e}", rec.pid);
        }
        Ok(vf)
    }

    /// Takes `id` out of the relay and waits until its frontend has let go
    /// (or the relay is gone): only then may its CID and memory be granted
    /// again. It never gives up while the relay runs and says it is still
    /// attached, logging an error every `UNMAP_DEADLINE`.
    pub(super) async fn stop_vsock(&self, id: &PartitionId, def: &Definition) {
        if def.vsock.is_none() {
            return;
        }
        let Ok(cid) = self.granted_cid(id) else {
            return;
        };
        let vf = VsockFiles::new(&self.settings.state_dir);
        let mut t0 = Instant::now();
        loop {
            let Some(rec) = process::read_json::<IoRecord>(&vf.record()).filter(IoRecord::alive)
            else {
                tracing::info!("{id}: no vsock relay runs; CID {cid} is free");
                return;
            };
            match io::vsock_request(&vf.control(), &Request::Remove { cid }).await {
                Ok(r) if r.connected != Some(true) => {
                    tracing::info!(
                        "{id}: vsock CID {cid} removed, {} connection(s) reset",
                        r.reset.unwrap_or(0)
                    );
                    return;
                }
                Ok(_) if t0.elapsed() >= io::UNMAP_DEADLINE => {
                    tracing::error!("{id}: part-io vsock pid {} still has CID {cid}'s frontend after {} s; its CID and memory stay held", rec.pid, io::UNMAP_DEADLINE.as_secs());
                    t0 = Instant::now();
                }
                Ok(_) => {}
                Err(e) if t0.elapsed() >= io::UNMAP_DEADLINE => {
                    tracing::error!(
                        "{id}: cannot remove vsock CID {cid}: {e}; its CID and memory stay held"
                    );
                    t0 = Instant::now();
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The vsock relay, as `id`'s I/O partition, for `show`.
    pub(super) fn vsock_view(&self, id: &PartitionId, def: &Definition) -> Option<IoView> {
        def.vsock.as_ref()?;
        let vf = VsockFiles::new(&self.settings.state_dir);
        let r = process::read_json::<IoRecord>(&vf.record())?;
        Some(IoView {
            kind: IoKind::Vsock,
            switch: None,
            pid: r.pid,
            start_time: r.start_time,
            alive: r.alive(),
            sockets: vec![vf.port_socket(id.as_str()), self.vsock_host_socket(id)],
            log: vf.log(),
        })
    }
}
