//! The wasmtime engine every process of the sandboxer uses, and the cache of modules
//! compiled for it.
//!
//! A module is compiled once per content and engine configuration: the precompiled form
//! lands in `<cache_dir>/<sha256>.cwasm`, and every container that runs the same module
//! later, in any pod, only maps that file.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine};

/// The engine configuration, identical in the sandboxer (which compiles) and in the
/// workers (which load what it compiled).
pub fn engine() -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.parallel_compilation(true);
    Engine::new(&config).map_err(|err| anyhow::anyhow!("create the wasmtime engine: {err:#}"))
}

/// Compiled modules on disk.
pub struct ModuleCache {
    engine: Engine,
    dir: PathBuf,
    /// Distinguishes engine configurations and wasmtime versions in cache keys.
    engine_key: u64,
}

impl ModuleCache {
    /// A cache in `dir`, created if missing.
    pub fn new(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("create module cache {}", dir.display()))?;
        let engine = engine()?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hasher.finish();
        Ok(Self {
            engine,
            dir,
            engine_key,
        })
    }

    /// Returns the precompiled form of the module at `path`, compiling it on first use.
    ///
    /// Fails with a message naming `shown_as` (the module's path inside the container)
    /// when the file is missing or not a valid WebAssembly module.
    pub fn prepare(&self, path: &Path, shown_as: &str) -> anyhow::Result<PathBuf> {
        let bytes = std::fs::read(path).with_context(|| format!("read module {shown_as}"))?;
        let mut digest = Sha256::new();
        digest.update(self.engine_key.to_le_bytes());
        digest.update(&bytes);
        let key: String = digest
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let compiled = self.dir.join(format!("{key}.cwasm"));
        if compiled.exists() {
            tracing::debug!(module = shown_as, cache = %compiled.display(), "compiled module from cache");
            return Ok(compiled);
        }

        let started = std::time::Instant::now();
        let artifact = self.engine.precompile_module(&bytes).map_err(|err| {
            anyhow::anyhow!("{shown_as} is not a valid WebAssembly module: {err:#}")
        })?;
        let partial = self
            .dir
            .join(format!("{key}.{}.partial", std::process::id()));
        std::fs::write(&partial, &artifact)
            .with_context(|| format!("write {}", partial.display()))?;
        std::fs::rename(&partial, &compiled)
            .with_context(|| format!("store {}", compiled.display()))?;
        tracing::info!(
            module = shown_as,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled module"
        );
        Ok(compiled)
    }
}
