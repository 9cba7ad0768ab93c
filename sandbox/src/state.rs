//! Records a sandboxer keeps on disk to find its pods and containers again after a
//! restart: small JSON files, each replaced whole so that a crash never leaves half of one.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Writes `value` to `path` as JSON, atomically (a temporary file renamed over it).
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(value).context("encode record")?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, bytes)
        .with_context(|| format!("write {}", Path::new(&temporary).display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("replace {}", path.display()))
}

/// Reads the JSON record at `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("decode {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_replace_whole() {
        let dir = std::env::temp_dir().join(format!("kuasar-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pod.json");
        write_json(&path, &vec![1, 2, 3]).unwrap();
        write_json(&path, &vec![4]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), vec![4]);
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "a temporary file was left");
        std::fs::write(&path, b"{").unwrap();
        let err = read_json::<Vec<u32>>(&path).unwrap_err();
        assert!(format!("{err:#}").contains("pod.json"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
