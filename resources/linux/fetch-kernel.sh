#!/usr/bin/env bash
# Fetches Debian's cloud kernel and extracts its vmlinux (an ELF with a PVH
# note) for the Linux smoke test, the way the kernel's scripts/extract-vmlinux
# does for an LZ4 payload.
#
# Usage: resources/linux/fetch-kernel.sh [DEST]   (default: target/linux)
#
# Always writes DEST/status: "ok" when DEST/vmlinux and DEST/bzImage are
# ready, or "missing: <reason>" when the package could not be had. The smoke
# test reads it: no status file means the fetch was never attempted (a test
# failure); "missing" makes the test print "skipped: <reason>".
set -uo pipefail
dest=${1:-target/linux}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
status() { echo "$1" > "$dest/status"; echo "fetch-kernel: $1"; }

if [ -s "$dest/vmlinux" ] && [ -s "$dest/bzImage" ] && [ "$(cat "$dest/status" 2>/dev/null)" = ok ]; then
    echo "fetch-kernel: already present in $dest"
    exit 0
fi
for tool in apt-cache apt-get dpkg-deb lz4 python3; do
    command -v "$tool" >/dev/null || { status "missing: $tool is not installed"; exit 0; }
done
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
    status "missing: apt cannot resolve linux-image-cloud-amd64 (run apt-get update)"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download "$pkg" >/dev/null 2>"$work/err"); then
    status "missing: apt-get download $pkg failed: $(tail -n1 "$work/err")"
    exit 0
fi
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/x"
vmlinuz=$(ls "$work"/x/boot/vmlinuz-* 2>/dev/null | head -n1)
if [ -z "$vmlinuz" ]; then
    status "missing: $pkg ships no /boot/vmlinuz"
    exit 0
fi
# LZ4 legacy frame magic 02 21 4c 18.
off=$(python3 -c "import sys; d=open(sys.argv[1],'rb').read(); print(d.find(b'\x02\x21\x4c\x18'))" "$vmlinuz")
if [ "$off" -lt 0 ]; then
    status "missing: $pkg's bzImage has no LZ4 payload"
    exit 0
fi
tail -c +$((off + 1)) "$vmlinuz" | lz4 -dc > "$work/vmlinux" 2>/dev/null
if [ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' \n')" != 7f454c46 ]; then
    status "missing: the LZ4 payload of $pkg is not an ELF"
    exit 0
fi
cp "$work/vmlinux" "$dest/vmlinux"
cp "$vmlinuz" "$dest/bzImage"
echo "$pkg" > "$dest/package"
status ok
