#!/bin/sh
# Boots systemd as PID 1 of private pid, mount and cgroup namespaces, so a
# test can run partd under its real unit on a machine whose own PID 1 is
# not systemd (CI containers). Usage: container.sh ID UNIT_DIR TARGET
#
# What keeps it from touching the host:
# - its own pid, mount, cgroup, UTS (hostname) and IPC namespaces, and a
#   read-only /proc/sys (systemd would raise global limits at boot). The
#   network namespace stays the host's: partd's children get their own.
# - cgroups: a child cgroup ID in every hierarchy, entered before the
#   cgroup namespace is made, is that namespace's root, so systemd manages
#   that subtree only. Their paths are appended to UNIT_DIR/../cgroups; the
#   caller removes them (deepest first) when everything inside is gone.
# - /run, /tmp, /var/tmp and /var/log/journal are fresh tmpfs mounts in the
#   new mount namespace (systemd-tmpfiles would otherwise clean the host's
#   /tmp, and journald write the host's journal).
# - systemd boots TARGET, copied with the other units of UNIT_DIR into
#   /run/systemd/system, not the host's default target, and every unit the
#   host's targets want is masked: no host service starts.
# Kill this process (it stays the namespace's parent, `--kill-child`) and
# everything inside dies with systemd.
set -eu
id=$1 units=$2 target=$3
for sd in /lib/systemd/systemd /usr/lib/systemd/systemd; do
    [ -x "$sd" ] && break
done
[ -x "$sd" ] || { echo "container.sh: systemd not found" >&2; exit 2; }
mounts=$(awk '$3 == "cgroup" || $3 == "cgroup2" { print $2, $3, $4 }' /proc/mounts)
[ -n "$mounts" ] || { echo "container.sh: no cgroup hierarchy mounted" >&2; exit 2; }
# Our cgroup in the hierarchy whose first controller (or name=) is $1, or
# in the v2 tree for "".
own() {
    awk -F: -v k="$1" '{
        n = split($2, a, ",")
        if (k == "" && $2 == "") print $3
        for (i = 1; i <= n; i++) if (a[i] == k) print $3
    }' /proc/self/cgroup | head -n 1
}
echo "$mounts" | while read -r dir type opts; do
    key=
    if [ "$type" = cgroup ]; then
        # The first option that names a controller (or name=), as
        # /proc/self/cgroup spells the hierarchy.
        key=$(echo "$opts" | tr , "\n" |
            grep -vxE "rw|ro|relatime|noatime|nosuid|nodev|noexec|xattr|clone_children|cpuset_v2_mode|noprefix|release_agent=.*" |
            head -n 1)
        [ -n "$(own "$key")" ] || { echo "container.sh: no cgroup of ours in $dir" >&2; exit 2; }
    fi
    parent="$dir$(own "$key")"
    child="$parent/$id"
    mkdir -p "$child"
    # A new cpuset has no CPUs or memory nodes until given its parent's.
    for f in cpuset.cpus cpuset.mems; do
        if [ -f "$parent/$f" ]; then cat "$parent/$f" > "$child/$f"; fi
    done
    echo $$ > "$child/cgroup.procs"
    echo "$child" >> "$units/../cgroups"
done
export PV_MOUNTS="$mounts" PV_UNITS="$units" PV_TARGET="$target" PV_SYSTEMD="$sd"
# The script below is one single-quoted word: no apostrophes in it.
exec unshare --cgroup --pid --fork --mount --uts --ipc --propagation private --kill-child sh -c '
set -eu
mount -t proc proc /proc
# systemd as PID 1 tunes kernel settings at boot (fs.nr_open, file-max):
# not those of the host.
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
if [ "$(stat -f -c %T /sys/fs/cgroup)" = tmpfs ]; then
    mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
fi
echo "$PV_MOUNTS" | while read -r dir type opts; do
    mkdir -p "$dir"
    o=$(echo "$opts" | tr , "\n" | grep -vxE "rw|ro|relatime|nosuid|nodev|noexec" | paste -sd, -)
    mount -t "$type" -o "${o:-defaults}" "$type" "$dir"
done
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system
# Mask what the host would start at boot (sysinit would apply sysctls,
# load modules, run tmpfiles on the host file system): only the units given
# run, with nothing but their own dependencies.
for wants in /lib/systemd/system/*.target.wants /etc/systemd/system/*.target.wants; do
    [ -d "$wants" ] || continue
    for u in "$wants"/*; do
        [ -e "$u" ] || [ -L "$u" ] || continue
        ln -sf /dev/null "/run/systemd/system/${u##*/}"
    done
done
# Pulled in by the root mount itself: it would remount the root file
# system of the host as /etc/fstab says.
for u in systemd-remount-fs.service systemd-fsck-root.service; do
    ln -sf /dev/null "/run/systemd/system/$u"
done
# A given unit may share a name with a masked one: replace the mask.
for u in "$PV_UNITS"/*; do rm -f "/run/systemd/system/${u##*/}"; done
cp -r "$PV_UNITS"/. /run/systemd/system/
for d in /tmp /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs "$d"; done
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
exec env container=partvisor-test "$PV_SYSTEMD" --system --unit="$PV_TARGET" \
    --log-target=console --show-status=no
'
