# Developer entry points. The end-to-end tests drive a real containerd and need root.

CARGO ?= cargo

.PHONY: all setup build test bench lint fmt clean

all: build

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --workspace --all-targets

# The sandboxer binaries (runc-sandboxer, wasm-sandboxer) are built first: the end-to-end tests
# start them as separate processes.
test: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

# Each family against its baseline on one containerd, on release builds: the runc sandboxer
# against containerd's runc shim, the wasm sandboxer against the runc sandboxer, the quark
# sandboxer against containerd's runc shim driving runsc. Arguments go through BENCH_ARGS,
# e.g. make bench BENCH_ARGS="--iterations 20 --only wasm".
BENCH_TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
BENCH_ARGS ?=

bench: setup
	$(CARGO) build --release --workspace --bins
	KUASAR_RUNC_SANDBOXER=$(BENCH_TARGET_DIR)/release/runc-sandboxer \
	KUASAR_WASM_SANDBOXER=$(BENCH_TARGET_DIR)/release/wasm-sandboxer \
	KUASAR_QUARK_SANDBOXER=$(BENCH_TARGET_DIR)/release/quark-sandboxer \
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

# The microVM guest image: an uncompressed kernel and an initramfs under .cache/guest/, from
# Debian's kernel package. A different init goes in as GUEST_INIT=path.
.PHONY: guest
guest:
	bash scripts/build-guest.sh
