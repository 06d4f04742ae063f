//! A throwaway Redis Cluster: three primaries (no replicas) on free ports, each a
//! [`RedisServer`] with `--cluster-enabled yes`, joined with `redis-cli --cluster create`.
//! Every node is killed on drop.
//!
//! `cluster-require-full-coverage` is off, as recommended for idempotency claims: with it on (the
//! Redis default), one dead primary without a replica makes *every* node refuse every command
//! once the failure is detected, so all claims fail closed instead of only those on the dead
//! node's slots. docs/RELIABILITY.md explains the choice.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use super::RedisServer;

/// Slots a key maps to, per the cluster spec (CRC16/XMODEM of the key or its `{hash tag}`,
/// modulo 16384). Lets tests pick keys on a given node without asking the cluster.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16_xmodem(hashed) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// Inclusive slot ranges served by each node, by index into `nodes`.
    slots: Vec<Vec<(u16, u16)>>,
}

impl RedisCluster {
    /// Starts three primaries and forms the cluster; returns once every node reports
    /// `cluster_state:ok`. Panics with install instructions when `redis-server` is missing.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli failed to run (it ships with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = RedisCluster {
            nodes,
            slots: Vec::new(),
        };
        cluster.wait_until_ok(Duration::from_secs(15));
        cluster.slots = cluster.read_slots();
        cluster
    }

    fn wait_until_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let all_ok = self.nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && n.cli(&["CLUSTER", "SLOTS"]).lines().count() > 3
            });
            if all_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Which slot ranges each node serves, from `CLUSTER SHARDS`-independent `CLUSTER NODES`.
    fn read_slots(&self) -> Vec<Vec<(u16, u16)>> {
        let nodes = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        self.nodes
            .iter()
            .map(|n| {
                let me = format!("127.0.0.1:{}@", n.port());
                let line = nodes
                    .lines()
                    .find(|l| l.contains(&me))
                    .unwrap_or_else(|| panic!("node {me} missing from CLUSTER NODES:\n{nodes}"));
                line.split_whitespace()
                    .skip(8)
                    .filter_map(|range| {
                        let (a, b) = range.split_once('-').unwrap_or((range, range));
                        Some((a.parse().ok()?, b.parse().ok()?))
                    })
                    .collect()
            })
            .collect()
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// The index of the node serving `key`.
    pub fn node_of(&self, key: &str) -> usize {
        let slot = key_slot(key);
        self.slots
            .iter()
            .position(|ranges| ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .unwrap_or_else(|| panic!("no node serves slot {slot}"))
    }

    /// `n` keys `prefix-0`, `prefix-1`, ... that live on node `node`.
    pub fn keys_on(&self, node: usize, prefix: &str, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .filter(|k| self.node_of(k) == node)
            .take(n)
            .collect()
    }

    /// Kills one primary (SIGKILL), leaving its slots unserved.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Runs `redis-cli -c` (follows redirects) against the first live node.
    pub fn cli(&self, args: &[&str]) -> String {
        self.nodes[0].cli(&[&["-c"], args].concat())
    }
}
