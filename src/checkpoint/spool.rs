//! The batch spool: every batch taken from the API is written to disk before it is trained on
//! and deleted once a checkpoint covers it. The Atropos API forgets a batch the moment it serves
//! it, so this is what lets `--resume` continue with no lost and no repeated data.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{io_err, CheckpointError};

/// Sequence number of a batch taken from the API (1-based, in the order they were fetched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct BatchSeq(pub u64);

/// A directory of `batch-NNNNNNNNNN.json` files.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens (creating) the spool directory.
    pub fn open(dir: PathBuf) -> Result<Self, CheckpointError> {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self { dir })
    }

    fn path_of(&self, seq: BatchSeq) -> PathBuf {
        self.dir.join(format!("batch-{:010}.json", seq.0))
    }

    /// Durably writes a batch's raw groups.
    pub fn write(&self, seq: BatchSeq, groups: &[Value]) -> Result<(), CheckpointError> {
        let path = self.path_of(seq);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(groups).map_err(|e| CheckpointError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_synced(&tmp, &body)?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    /// Sequence numbers present, ascending.
    pub fn list(&self) -> Result<Vec<BatchSeq>, CheckpointError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let name = entry.map_err(io_err(&self.dir))?.file_name();
            let seq = name
                .to_str()
                .and_then(|n| n.strip_prefix("batch-"))
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse().ok());
            if let Some(seq) = seq {
                out.push(BatchSeq(seq));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads a spooled batch.
    pub fn read(&self, seq: BatchSeq) -> Result<Vec<Value>, CheckpointError> {
        let path = self.path_of(seq);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Format {
            path,
            reason: e.to_string(),
        })
    }

    /// Deletes every batch up to and including `upto`.
    pub fn release_through(&self, upto: BatchSeq) -> Result<usize, CheckpointError> {
        let mut n = 0;
        for seq in self.list()?.into_iter().filter(|s| *s <= upto) {
            let path = self.path_of(seq);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            n += 1;
        }
        Ok(n)
    }
}

/// Writes and fsyncs a file.
pub fn write_synced(path: &Path, body: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(body).and_then(|_| f.sync_all()).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_list_read_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path().join("spool")).expect("open");
        for i in 1..=3 {
            spool.write(BatchSeq(i), &[serde_json::json!({"i": i})]).expect("write");
        }
        assert_eq!(spool.list().expect("list"), vec![BatchSeq(1), BatchSeq(2), BatchSeq(3)]);
        assert_eq!(
            spool.read(BatchSeq(2)).expect("read"),
            vec![serde_json::json!({"i": 2})]
        );
        assert_eq!(spool.release_through(BatchSeq(2)).expect("release"), 2);
        assert_eq!(spool.list().expect("list"), vec![BatchSeq(3)]);
    }
}
