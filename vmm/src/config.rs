//! The microVM family's section of the configuration file.
//!
//! ```toml
//! [vmm]
//! hypervisor = "qemu-system-x86_64"   # QEMU binary; looked up in PATH unless absolute
//! vhost_vsock = "vhost-device-vsock"  # the hybrid vsock device backend
//! kernel = "/var/lib/kuasar/vmm/vmlinux"        # uncompressed guest kernel (make guest)
//! initrd = "/var/lib/kuasar/vmm/initramfs.cpio" # guest image with the agent as init
//! accelerator = "auto"    # kvm, tcg, or auto: KVM when a probe guest boots on it
//! memory_mib = 256        # guest RAM
//! vcpus = 1
//! boot_timeout_secs = 30  # from QEMU's start to the agent answering
//! kernel_params = ""      # appended to the guest kernel's command line
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::hypervisor::Accelerator;

/// Settings of the microVM family.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct VmmSettings {
    /// How to run the pods' VMs.
    pub vmm: VmmSection,
}

/// The `[vmm]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmmSection {
    /// The QEMU binary.
    pub hypervisor: PathBuf,
    /// The vhost-user vsock backend binary.
    pub vhost_vsock: PathBuf,
    /// Uncompressed guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs holding the agent.
    pub initrd: PathBuf,
    /// Which accelerator the VMs use.
    pub accelerator: Accelerator,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub vcpus: u32,
    /// How long a guest may take from QEMU's start to its agent answering.
    pub boot_timeout_secs: u64,
    /// Appended to the guest kernel's command line.
    pub kernel_params: String,
}

impl Default for VmmSection {
    fn default() -> Self {
        Self {
            hypervisor: "qemu-system-x86_64".into(),
            vhost_vsock: "vhost-device-vsock".into(),
            kernel: "/var/lib/kuasar/vmm/vmlinux".into(),
            initrd: "/var/lib/kuasar/vmm/initramfs.cpio".into(),
            accelerator: Accelerator::Auto,
            memory_mib: 256,
            vcpus: 1,
            boot_timeout_secs: 30,
            kernel_params: String::new(),
        }
    }
}

impl VmmSection {
    /// Checks what can be checked before any pod: the values and the guest image's files.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.memory_mib < 64 {
            anyhow::bail!(
                "[vmm] memory_mib = {} is too small for a guest (at least 64)",
                self.memory_mib
            );
        }
        if self.vcpus == 0 {
            anyhow::bail!("[vmm] vcpus must be at least 1");
        }
        if self.boot_timeout_secs == 0 {
            anyhow::bail!("[vmm] boot_timeout_secs must be at least 1");
        }
        Ok(())
    }

    /// The boot timeout.
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }

    /// The guest image's files that are missing, named for an error message.
    pub fn missing_image_files(&self) -> Vec<String> {
        [("kernel", &self.kernel), ("initrd", &self.initrd)]
            .into_iter()
            .filter(|(_, path)| !path.is_file())
            .map(|(what, path)| format!("[vmm] {what} {}", path.display()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let settings: VmmSettings =
            toml::from_str("[vmm]\naccelerator = \"tcg\"\nmemory_mib = 512\n").unwrap();
        assert_eq!(settings.vmm.accelerator, Accelerator::Tcg);
        assert_eq!(settings.vmm.memory_mib, 512);
        assert_eq!(settings.vmm.vcpus, 1);
        settings.vmm.validate().unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        assert!(toml::from_str::<VmmSettings>("[vmm]\naccelerator = \"hvf\"\n").is_err());
        assert!(toml::from_str::<VmmSettings>("[vmm]\nkernell = \"x\"\n").is_err());
        let small = VmmSection {
            memory_mib: 16,
            ..Default::default()
        };
        assert!(small
            .validate()
            .unwrap_err()
            .to_string()
            .contains("memory_mib"));
        let missing = VmmSection {
            kernel: "/nonexistent/vmlinux".into(),
            ..Default::default()
        };
        assert!(missing.missing_image_files()[0].contains("/nonexistent/vmlinux"));
    }
}
