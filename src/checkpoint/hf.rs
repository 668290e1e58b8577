//! HF-format checkpoint directories (`config.json`, tokenizer files, safetensors), written into
//! a temporary sibling and renamed into place so a crash never leaves half a checkpoint.

use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::model::safetensors_io::write_model;

use super::{io_err, CheckpointError};

/// Files copied verbatim from the source model directory when present.
pub const COPIED_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Which checkpoint a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// `step_N`, written every `--checkpoint-interval` steps and on shutdown.
    Step(u64),
    /// `final_model`, written when the run completes.
    Final,
    /// `sync_step_N`: weights for sidecars to reload (checkpoint bridge mode); no training state.
    Sync(u64),
}

impl CheckpointKind {
    /// The directory name under `--save-path`.
    pub fn dir_name(self) -> String {
        match self {
            Self::Step(n) => format!("step_{n}"),
            Self::Final => "final_model".into(),
            Self::Sync(n) => format!("sync_step_{n}"),
        }
    }

    /// The directory name of a LoRA adapter checkpoint of this kind (the Atropos trainer's
    /// names): `adapter_step_N`, `final_adapter`, `sync_adapter_step_N`.
    pub fn adapter_dir_name(self) -> String {
        match self {
            Self::Step(n) => format!("adapter_step_{n}"),
            Self::Final => "final_adapter".into(),
            Self::Sync(n) => format!("sync_adapter_step_{n}"),
        }
    }
}

/// Prefix of full-weight step checkpoints.
pub const STEP_PREFIX: &str = "step_";
/// Prefix of LoRA adapter step checkpoints.
pub const ADAPTER_STEP_PREFIX: &str = "adapter_step_";

/// Writes `weights` (HF names, tied `lm_head` already omitted) as an HF directory at
/// `save_path/<kind>`, with `extra` called on the temporary directory before the rename (for
/// the training state). An existing directory of that name is replaced.
pub fn write_hf_checkpoint(
    save_path: &Path,
    kind: CheckpointKind,
    source_model: &Path,
    weights: &[(String, Tensor)],
    max_shard_bytes: u64,
    extra: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<PathBuf, CheckpointError> {
    write_checkpoint_dir(save_path, &kind.dir_name(), source_model, |tmp| {
        write_model(tmp, weights, max_shard_bytes)?;
        extra(tmp)
    })
}

/// Writes `save_path/<name>` atomically: the source model's config and tokenizer files, then
/// whatever `fill` writes, into a temporary sibling that is synced and renamed into place.
pub fn write_checkpoint_dir(
    save_path: &Path,
    name: &str,
    source_model: &Path,
    fill: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<PathBuf, CheckpointError> {
    let target = save_path.join(name);
    let tmp = save_path.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    for name in COPIED_FILES {
        let src = source_model.join(name);
        if src.is_file() {
            let dst = tmp.join(name);
            std::fs::copy(&src, &dst).map_err(io_err(&dst))?;
        }
    }
    fill(&tmp)?;
    sync_dir(&tmp)?;
    if target.exists() {
        let old = save_path.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(&target, &old).map_err(io_err(&target))?;
        std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
    }
    // The rename is durable once the parent's entry is; its contents were synced above. The
    // parent is not walked: other actors write there meanwhile (the spool renames its batches),
    // and older checkpoints need no second fsync.
    sync_dir_entry(save_path)?;
    Ok(target)
}

/// Flushes a directory's own entries (names, renames), not the files in it.
pub fn sync_dir_entry(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_err(dir))
}

/// Flushes every file in `dir` (one level, plus subdirectories) and the directory itself.
pub fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            sync_dir(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
        }
    }
    sync_dir_entry(dir)
}

/// Deletes `sync_step_N` directories older than `newest`, keeping the one before it (a
/// sidecar may still be reading it).
pub fn prune_sync_checkpoints(save_path: &Path, newest: u64) -> Result<(), CheckpointError> {
    prune_sync_dirs(save_path, "sync_step_", newest)
}

/// [`prune_sync_checkpoints`] for directories named `<prefix>N`.
pub fn prune_sync_dirs(save_path: &Path, prefix: &str, newest: u64) -> Result<(), CheckpointError> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(save_path).map_err(io_err(save_path))? {
        let path = entry.map_err(io_err(save_path))?.path();
        let n = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.parse().ok());
        if let Some(n) = n.filter(|&n| n < newest) {
            found.push((n, path));
        }
    }
    found.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    for (_, dir) in found.into_iter().skip(1) {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    Ok(())
}

/// Deletes the oldest `step_N` directories beyond the newest `keep`.
pub fn prune_step_checkpoints(save_path: &Path, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    prune_dirs(save_path, STEP_PREFIX, keep)
}

/// Deletes the oldest `<prefix>N` directories beyond the newest `keep`.
pub fn prune_dirs(save_path: &Path, prefix: &str, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut steps = dirs_with_prefix(save_path, prefix)?;
    steps.sort_by_key(|(n, _)| *n);
    let excess = steps.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, dir) in steps.into_iter().take(excess) {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// The `step_N` directories under `save_path`.
pub fn step_dirs(save_path: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    dirs_with_prefix(save_path, STEP_PREFIX)
}

/// The `<prefix>N` directories under `save_path`.
pub fn dirs_with_prefix(save_path: &Path, prefix: &str) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    if !save_path.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(save_path).map_err(io_err(save_path))? {
        let entry = entry.map_err(io_err(save_path))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix(prefix))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Other writers share the save path: the spool renames `batch-N.tmp` to `batch-N.json`
    /// while a checkpoint is being written. A name listed and then gone must not fail the
    /// checkpoint (a CI run once lost `lora_kill_and_resume...` to it). The dangling link stands
    /// in for a file that vanished between the listing and the open.
    #[test]
    fn a_file_vanishing_beside_the_checkpoint_does_not_fail_it() {
        let save = tempfile::tempdir().expect("save");
        let model = tempfile::tempdir().expect("model");
        std::fs::write(model.path().join("config.json"), b"{}").expect("config");
        let spool = save.path().join("spool");
        std::fs::create_dir_all(&spool).expect("spool");
        std::os::unix::fs::symlink(spool.join("gone"), spool.join("batch-0000000004.tmp")).expect("link");
        let dir = write_checkpoint_dir(save.path(), "step_2", model.path(), |d| {
            std::fs::write(d.join("state.json"), b"{}").map_err(io_err(d))
        })
        .expect("the checkpoint is written");
        assert!(dir.join("state.json").is_file() && dir.join("config.json").is_file());
        assert!(!save.path().join(format!(".tmp-step_2-{}", std::process::id())).exists());
    }
}
