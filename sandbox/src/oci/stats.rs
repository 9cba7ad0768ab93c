//! Converts `events --stats` output of runc and runsc into containerd's cgroup metrics.

use anyhow::Context;
use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::MessageFull;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Event {
    data: Stats,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Stats {
    cpu: Cpu,
    memory: Memory,
    pids: Pids,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Cpu {
    usage: CpuUsage,
    throttling: Throttling,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CpuUsage {
    total: u64,
    percpu: Vec<u64>,
    kernel: u64,
    user: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Throttling {
    periods: u64,
    #[serde(rename = "throttledPeriods")]
    throttled_periods: u64,
    #[serde(rename = "throttledTime")]
    throttled_time: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Memory {
    cache: u64,
    usage: MemoryEntry,
    swap: MemoryEntry,
    kernel: MemoryEntry,
    raw: std::collections::HashMap<String, u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MemoryEntry {
    limit: u64,
    usage: u64,
    max: u64,
    failcnt: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Pids {
    current: u64,
    limit: u64,
}

/// Decodes one `runc events --stats` document into `io.containerd.cgroups.v1.Metrics`,
/// or `v2` on a unified cgroup host.
pub fn to_metrics(json: &[u8], unified: bool) -> anyhow::Result<Any> {
    let event: Event = serde_json::from_slice(json).context("runc stats are not JSON")?;
    let stats = event.data;
    let raw = |key: &str| stats.memory.raw.get(key).copied().unwrap_or_default();
    if unified {
        let mut metrics = v2::Metrics::new();
        metrics.pids = Some(v2::PidsStat {
            current: stats.pids.current,
            limit: stats.pids.limit,
            ..Default::default()
        })
        .into();
        metrics.cpu = Some(v2::CPUStat {
            usage_usec: stats.cpu.usage.total / 1000,
            user_usec: stats.cpu.usage.user / 1000,
            system_usec: stats.cpu.usage.kernel / 1000,
            nr_periods: stats.cpu.throttling.periods,
            nr_throttled: stats.cpu.throttling.throttled_periods,
            throttled_usec: stats.cpu.throttling.throttled_time / 1000,
            ..Default::default()
        })
        .into();
        metrics.memory = Some(v2::MemoryStat {
            anon: raw("anon"),
            file: raw("file"),
            inactive_file: raw("inactive_file"),
            active_file: raw("active_file"),
            pgfault: raw("pgfault"),
            pgmajfault: raw("pgmajfault"),
            usage: stats.memory.usage.usage,
            usage_limit: stats.memory.usage.limit,
            max_usage: stats.memory.usage.max,
            swap_usage: stats.memory.swap.usage,
            swap_limit: stats.memory.swap.limit,
            ..Default::default()
        })
        .into();
        return Ok(pack(&metrics));
    }

    let entry = |e: &MemoryEntry| v1::MemoryEntry {
        limit: e.limit,
        usage: e.usage,
        max: e.max,
        failcnt: e.failcnt,
        ..Default::default()
    };
    let mut metrics = v1::Metrics::new();
    metrics.pids = Some(v1::PidsStat {
        current: stats.pids.current,
        limit: stats.pids.limit,
        ..Default::default()
    })
    .into();
    metrics.cpu = Some(v1::CPUStat {
        usage: Some(v1::CPUUsage {
            total: stats.cpu.usage.total,
            kernel: stats.cpu.usage.kernel,
            user: stats.cpu.usage.user,
            per_cpu: stats.cpu.usage.percpu.clone(),
            ..Default::default()
        })
        .into(),
        throttling: Some(v1::Throttle {
            periods: stats.cpu.throttling.periods,
            throttled_periods: stats.cpu.throttling.throttled_periods,
            throttled_time: stats.cpu.throttling.throttled_time,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    })
    .into();
    metrics.memory = Some(v1::MemoryStat {
        cache: stats.memory.cache,
        rss: raw("rss"),
        mapped_file: raw("mapped_file"),
        inactive_file: raw("inactive_file"),
        active_file: raw("active_file"),
        pg_fault: raw("pgfault"),
        pg_maj_fault: raw("pgmajfault"),
        total_cache: raw("total_cache"),
        total_rss: raw("total_rss"),
        total_inactive_file: raw("total_inactive_file"),
        total_active_file: raw("total_active_file"),
        hierarchical_memory_limit: raw("hierarchical_memory_limit"),
        usage: Some(entry(&stats.memory.usage)).into(),
        swap: Some(entry(&stats.memory.swap)).into(),
        kernel: Some(entry(&stats.memory.kernel)).into(),
        ..Default::default()
    })
    .into();
    Ok(pack(&metrics))
}

fn pack<M: MessageFull>(message: &M) -> Any {
    let mut any = Any::new();
    any.type_url = M::descriptor().full_name().to_string();
    any.value = message.write_to_bytes().unwrap_or_default();
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::Message;

    const SAMPLE: &str = r#"{"type":"stats","id":"c1","data":{
        "cpu":{"usage":{"percpu":[5000,7000],"total":12000,"kernel":2000,"user":10000},
               "throttling":{}},
        "memory":{"usage":{"limit":1048576,"usage":4096,"max":8192,"failcnt":0},
                  "cache":1024,"raw":{"total_inactive_file":512,"rss":2048}},
        "pids":{"current":3}}}"#;

    #[test]
    fn v1_metrics_carry_cpu_memory_and_pids() {
        let any = to_metrics(SAMPLE.as_bytes(), false).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let metrics = v1::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(metrics.cpu.usage.total, 12000);
        assert_eq!(metrics.cpu.usage.per_cpu, vec![5000, 7000]);
        assert_eq!(metrics.memory.usage.usage, 4096);
        assert_eq!(metrics.memory.usage.limit, 1048576);
        assert_eq!(metrics.memory.total_inactive_file, 512);
        assert_eq!(metrics.memory.rss, 2048);
        assert_eq!(metrics.pids.current, 3);
    }

    #[test]
    fn v2_metrics_use_microseconds() {
        let any = to_metrics(SAMPLE.as_bytes(), true).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let metrics = v2::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(metrics.cpu.usage_usec, 12);
        assert_eq!(metrics.memory.usage, 4096);
    }

    #[test]
    fn rejects_garbage() {
        assert!(to_metrics(b"not json", false).is_err());
    }
}
