//! What the cache holds, read by the metrics at scrape time. In a file of
//! its own so the cache's request path stays untouched by it.

use super::HttpCache;

impl HttpCache {
    /// Bytes and entries held by the memory tier.
    pub fn memory_usage(&self) -> (u64, u64) {
        (self.store.weight(), self.store.len() as u64)
    }
}

impl HttpCache {
    /// Bytes (in 4 KiB blocks) and entries of the disk tier as this process
    /// knows them; `None` without a disk tier.
    pub fn disk_usage(&self) -> Option<(u64, u64)> {
        self.disk.as_ref().map(|disk| disk.usage())
    }
}
