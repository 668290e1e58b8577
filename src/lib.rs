//! # grpo-node
//!
//! A GRPO trainer for language models that plugs into the Atropos RL ecosystem. Python
//! environments post scored rollouts to the Atropos API server (`run-api`); the learner pulls
//! batches, validates them, and trains with GRPO on libtorch (tch).
//!
//! ```text
//!  Atropos envs --POST /scored_data--> Atropos API (run-api)
//!                                          ^ GET /batch
//!                                          |
//!  learner node:  BatchFetcher -> Preprocessor -> Learner (model thread) -> Checkpointer
//! ```
//!
//! ## Module map
//! | module | job |
//! |---|---|
//! | [`config`] | flags, `GRPO_*` env vars and the TOML file, merged and validated |
//! | [`atropos`] | Atropos wire types and HTTP client (registration, wedge check, polling) |
//! | [`grpo`] | pure math: validation, advantages, alignment, packing, the loss |
//! | [`model`] | Llama / Qwen2 / Qwen3 transformer in tch, safetensors I/O |
//! | [`train`] | AdamW (fused on libtorch's kernel), LR schedule, layer filters, the staged micro-batch step, one optimizer step |
//! | [`comm`] | NCCL broadcast (feature `cuda`): non-blocking communicators, deadlines, abort |
//! | [`torch_ext`] | libtorch operations tch lacks, through the C++ shim in `csrc/` |
//! | [`bench`] | `grpo-node bench ...`: throughput measurements against references |
//! | [`checkpoint`] | HF checkpoints, training state, the batch spool |
//! | [`actors`] | the learner node's ractor actors and their messages |
//! | [`roles`] | each `--role`: builds its supervision tree and runs it |
//! | [`rpc`] | gRPC (`proto/grpo/v1`): the learner status service |
//! | [`runtime`] | the async runtime, and leaving it past threads stuck inside NCCL or the driver |
//! | [`telemetry`] | logging, `metrics.jsonl`, the per-step stderr line |

pub mod actors;
pub mod atropos;
pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod engine;
pub mod grpo;
pub mod launch;
pub mod model;
pub mod roles;
pub mod rpc;
pub mod runtime;
pub mod sync;
pub mod telemetry;
pub mod torch_ext;
pub mod train;
pub mod version;
