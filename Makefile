# Developer entry points. The end-to-end tests drive a real containerd and need root.

CARGO ?= cargo

.PHONY: all setup build test bench lint fmt clean

all: build

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --workspace --all-targets

# Every binary (the four sandboxers, the shims) is built first: the end-to-end tests start
# them as separate processes.
test: setup guest
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

# Each family against its baseline on one containerd, on release builds: the runc sandboxer
# against containerd's runc shim, the wasm sandboxer against the runc sandboxer, the quark
# sandboxer against containerd's runc shim driving runsc, and the vmm sandboxer's pod start,
# container start and memory per VM pod (needs make guest), and the runc family through its
# shim binary next to its native path on containerd 2.1.9. Arguments go through BENCH_ARGS,
# e.g. make bench BENCH_ARGS="--iterations 20 --only wasm".
BENCH_TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
BENCH_ARGS ?=

bench: setup
	$(CARGO) build --release --workspace --bins
	KUASAR_RUNC_SANDBOXER=$(BENCH_TARGET_DIR)/release/runc-sandboxer \
	KUASAR_WASM_SANDBOXER=$(BENCH_TARGET_DIR)/release/wasm-sandboxer \
	KUASAR_QUARK_SANDBOXER=$(BENCH_TARGET_DIR)/release/quark-sandboxer \
	KUASAR_VMM_SANDBOXER=$(BENCH_TARGET_DIR)/release/vmm-sandboxer \
	KUASAR_SHIM_RUNC=$(BENCH_TARGET_DIR)/release/containerd-shim-kuasar-runc-v2 \
	KUASAR_SHIM_WASM=$(BENCH_TARGET_DIR)/release/containerd-shim-kuasar-wasm-v2 \
	KUASAR_SHIM_QUARK=$(BENCH_TARGET_DIR)/release/containerd-shim-kuasar-quark-v2 \
	KUASAR_SHIM_VMM=$(BENCH_TARGET_DIR)/release/containerd-shim-kuasar-vmm-v2 \
		$(BENCH_TARGET_DIR)/release/kuasar-bench $(BENCH_ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

# The README's main job: one pod with two containers on a private containerd 2.1.9 through the
# runc sandboxer, shown step by step, then torn down and checked for leftovers.
.PHONY: demo
demo: setup
	$(CARGO) build --workspace --bins
	$(CARGO) run -p kuasar-tests --bin kuasar-demo

# The microVM guest image under .cache/guest/: an uncompressed kernel from Debian's kernel
# package, and initramfs.cpio with the guest agent (vmm-task, linked statically) as init,
# runc and the kernel modules it needs. initramfs-test.cpio holds a shell init that only
# reports readiness, for timing boots (cargo run -p vmm-sandboxer --example boot).
GUEST_TARGET_DIR := $(BENCH_TARGET_DIR)/guest-agent
GUEST_AGENT := $(GUEST_TARGET_DIR)/x86_64-unknown-linux-gnu/guest/vmm-task

.PHONY: guest
guest:
	RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$(GUEST_TARGET_DIR) \
		$(CARGO) build --profile guest -p vmm-task --target x86_64-unknown-linux-gnu
	GUEST_INIT=$(GUEST_AGENT) bash scripts/build-guest.sh
	GUEST_INIT=scripts/guest-test-init.sh GUEST_IMAGE_NAME=initramfs-test bash scripts/build-guest.sh
