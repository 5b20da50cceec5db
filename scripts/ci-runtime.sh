#!/usr/bin/env bash
# CI for the device runtime (runtime/): x86_64 lint + tests, the no-std check, the C ABI smoke
# test, and the aarch64 cross build with its tests under qemu-aarch64 (DESIGN §5), then the
# .text size of the aarch64 release static library. Exits non-zero if anything fails.
#
# Toolchains: rustup's cargo for x86_64; Debian's cargo/rustc 1.96 (rustc-web) for
# aarch64-unknown-linux-gnu, configured only through environment variables here (no
# .cargo/config), with its own target dir so the two toolchains never share artifacts.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
RT="$ROOT/runtime/Cargo.toml"
TD="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$TD/ci-runtime"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

# --- 0. packages (idempotent, non-interactive) ---------------------------------------------
step "packages"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
fi
missing=()
for p in gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user libc6:arm64 rustc-web cargo-web libstd-rust-web-dev:arm64; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "all present"
fi
for tool in /usr/bin/cargo /usr/bin/rustc aarch64-linux-gnu-gcc aarch64-linux-gnu-size qemu-aarch64 cc nm cmp; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool" >&2; exit 1; }
done

# --- 1. x86_64: format, lint, tests (rustup toolchain) --------------------------------------
step "x86_64: fmt + clippy + tests ($(cargo --version))"
cargo fmt --manifest-path "$RT" --check
cargo fmt --manifest-path "$ROOT/runtime/nostd-check/Cargo.toml" --check
cargo fmt --manifest-path "$ROOT/runtime/staticlib/Cargo.toml" --check
cargo fmt --manifest-path "$ROOT/runtime/testkit/Cargo.toml" --check
cargo clippy --manifest-path "$RT" --all-targets -- -D warnings
cargo clippy --manifest-path "$RT" --lib --no-default-features -- -D warnings
cargo clippy --manifest-path "$ROOT/runtime/testkit/Cargo.toml" -- -D warnings
cargo test --manifest-path "$RT"

# --- 2. no-std check -------------------------------------------------------------------------
step "no-std check"
NOSTD=(cargo build --manifest-path "$ROOT/runtime/nostd-check/Cargo.toml" --release)
# Bare-metal targets have no std at all: building there proves the runtime needs none
# (aarch64 64-bit, and a 32-bit Cortex-M4F). rustup may be unable to fetch them on a new
# machine; then the host check below still runs.
for t in aarch64-unknown-none thumbv7em-none-eabihf; do
  if command -v rustup >/dev/null; then
    timeout 180 rustup target add "$t" >/dev/null 2>&1 || echo "(rustup could not add $t)"
  fi
  if command -v rustup >/dev/null && rustup target list --installed | grep -qx "$t"; then
    CARGO_TARGET_DIR="$TD/nostd" "${NOSTD[@]}" --target "$t"
    echo "built for $t (a target without std)"
  fi
done
# Always: a std-less staticlib for the host must not reference std.
CARGO_TARGET_DIR="$TD/nostd" "${NOSTD[@]}"
NOSTD_A="$TD/nostd/release/libdiffdfq_nostd_check.a"
SYMS=$(nm "$NOSTD_A" 2>/dev/null)
grep -q ' T nostd_check_run$' <<<"$SYMS" || { echo "nm found no symbols in $NOSTD_A" >&2; exit 1; }
if grep -E '_ZN3std|_3std' <<<"$SYMS" >/dev/null; then
  echo "std symbols in $NOSTD_A" >&2
  exit 1
fi
echo "no std symbols in the no_std static library"

# --- 3. C ABI smoke test on x86_64 -----------------------------------------------------------
step "x86_64: static library + C smoke test"
# runtime/staticlib: the runtime + a panic handler, panic=abort, no std -> libdiffdfq_device.a
STATICLIB=(build --manifest-path "$ROOT/runtime/staticlib/Cargo.toml" --release)
CARGO_TARGET_DIR="$TD/staticlib" cargo "${STATICLIB[@]}"
cargo run -q --manifest-path "$RT" --example write_small_model -- "$OUT/small.dfq" 3 8
CFLAGS=(-std=c11 -Wall -Wextra -Werror -O2 -I "$ROOT/runtime/include")
cc "${CFLAGS[@]}" "$ROOT/runtime/tests/c/smoke.c" "$TD/staticlib/release/libdiffdfq_device.a" -o "$OUT/smoke-x86_64"
"$OUT/smoke-x86_64" "$OUT/small.dfq" >"$OUT/out-x86_64.txt"
echo "C smoke test passed on x86_64"

# --- 4. aarch64: Debian's toolchain, tests under qemu ----------------------------------------
step "aarch64: tests under qemu-aarch64 ($(/usr/bin/cargo --version))"
a64() {
  env RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64 \
    CARGO_TARGET_DIR="$TD/debian" \
    /usr/bin/cargo "$@"
}
a64 test --manifest-path "$RT" --target aarch64-unknown-linux-gnu
a64 "${STATICLIB[@]}" --target aarch64-unknown-linux-gnu
A64="$TD/debian/aarch64-unknown-linux-gnu/release/libdiffdfq_device.a"
aarch64-linux-gnu-gcc "${CFLAGS[@]}" -static "$ROOT/runtime/tests/c/smoke.c" "$A64" -o "$OUT/smoke-aarch64"
qemu-aarch64 "$OUT/smoke-aarch64" "$OUT/small.dfq" >"$OUT/out-aarch64.txt"
cmp "$OUT/out-x86_64.txt" "$OUT/out-aarch64.txt"
echo "C smoke test passed on aarch64; outputs bit-identical to x86_64"

# --- 5. size of the aarch64 release static library --------------------------------------------
step "aarch64 release staticlib: .text"
aarch64-linux-gnu-size -t "$A64" | tail -n 1 | awk '{printf "whole archive (all of core and compiler_builtins): %d bytes\n", $1}'
RT_TEXT=$(aarch64-linux-gnu-size "$A64" | awk '$6 ~ /^diffdfq_(runtime|device)/ {s += $1} END {print s + 0}')
echo "runtime objects (without core/compiler_builtins): $RT_TEXT bytes ($((RT_TEXT / 1024)) KiB)"
probe() {
  aarch64-linux-gnu-gcc -std=c11 -Os -static -ffunction-sections -Wl,--gc-sections -I "$ROOT/runtime/include" \
    "$@" "$ROOT/runtime/tests/c/size_probe.c" "$A64" -o "$OUT/probe"
  aarch64-linux-gnu-size "$OUT/probe" | awk 'NR == 2 {print $1}'
}
BASE=$(probe)
WITH=$(probe -DUSE_DFQ)
LINKED=$((WITH - BASE))
echo "linked into a static program (--gc-sections): +$LINKED bytes of text ($((LINKED / 1024)) KiB)"
if ((LINKED > 64 * 1024)); then
  echo "WARNING: the runtime's linked text exceeds the 64 KiB goal" >&2
fi
echo
echo "ci-runtime: all runtime checks passed"
