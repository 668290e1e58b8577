//! # grpo-node
//!
//! A GRPO trainer for language models that plugs into the Atropos RL ecosystem. Python
//! environments post scored rollouts to the Atropos API server (`run-api`); the learner pulls
//! batches, validates them, and trains with GRPO on libtorch (tch).
//!
//! ```text
//!  Atropos envs --POST /scored_data--> Atropos API (run-api)
//!        | /generate                       ^ GET /batch
//!        v                                 |
//!  sidecar node: engine (embedded | vLLM, run by the VllmSupervisor) <- WeightReceiver
//!                                                                         ^ gRPC (+ NCCL)
//!  learner node:  BatchFetcher -> Preprocessor -> Learner (model thread) -> WeightBroadcaster
//!                                                         \-> Checkpointer
//! ```
//!
//! ## Module map
//! Lower rows never import higher ones: `version`, `lock` and `secret` are leaves; `model`, `grpo`, `train`, `comm`
//! and `engine` sit below `sync`; `actors` and `roles` are on top.
//!
//! | module | job |
//! |---|---|
//! | [`version`] | leaf types of the weight bridge: `PolicyVersion`, the weight digest |
//! | [`lock`] | leaf: mutex locking that survives a panicked holder |
//! | [`secret`] | leaf: constant-time comparison of a presented token |
//! | [`config`] | flags, `GRPO_*` env vars and the TOML file, merged and validated; which addresses a multi-node run may use |
//! | [`atropos`] | Atropos wire types and HTTP client (registration, wedge check, polling) |
//! | [`grpo`] | pure math: validation, advantages, alignment, packing, the loss |
//! | [`model`] | Llama / Qwen2 / Qwen3 transformer in tch, safetensors I/O, LoRA adapters in PEFT's format, attention over packed rows (flash varlen) |
//! | [`train`] | AdamW (fused on libtorch's kernel), 8-bit AdamW and Adafactor, LoRA training, LR schedule, layer filters, the staged micro-batch step, one optimizer step, the lease on lent weights, data parallel across learner ranks, compute weights homed in another process's memory behind a write fence (shared mode with vLLM) |
//! | [`comm`] | NCCL broadcast and all-reduce (feature `cuda`): non-blocking communicators, deadlines, abort; libtorch's c10d gloo group on the CPU; mapping another process's GPU memory (CUDA IPC) |
//! | [`torch_ext`] | libtorch operations tch lacks, through the C++ shim in `csrc/` |
//! | [`engine`] | the `InferenceEngine` seam; the embedded engine; the vLLM driver (with LoRA adapters), its HTTP API and its weight-transfer plugin (CUDA IPC, NCCL, the shared-mode worker extension); where HF parameters lie in vLLM's fused ones; `/generate` |
//! | [`rpc`] | gRPC (`proto/grpo/v1`): generated types, the shared-token interceptors |
//! | [`sync`] | the weight bridge: bucket plan and packing, the learner's client, NCCL and CUDA IPC publishers, shared mode's attach loop and fence, the sidecar's service and WeightReceiver |
//! | [`bench`] | `grpo-node bench ...`: throughput measurements against references |
//! | [`checkpoint`] | HF checkpoints, training state, the batch spool |
//! | [`launch`] | `grpo-node launch`: the manifest schema, the local and Slurm backends, the per-node task and its rendezvous, readiness, the progress bar |
//! | [`actors`] | the nodes' ractor actors (learner side, and the sidecar's VllmSupervisor) and their messages |
//! | [`fuzz`] | `grpo-node bench fuzz`: seeded stable-Rust fuzzing of the batch, `/generate`, sync-plan, config and manifest parsers |
//! | [`roles`] | each `--role`: builds its supervision tree and runs it; learner ranks above 0; the learner's gRPC status service and `/endpoints` |
//! | [`runtime`] | the async runtime, and leaving it past threads stuck inside NCCL or the driver |
//! | [`telemetry`] | logging, `metrics.jsonl`, the per-step stderr line |

pub mod actors;
pub mod atropos;
pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod engine;
pub mod fuzz;
pub mod grpo;
pub mod launch;
pub mod lock;
pub mod model;
pub mod roles;
pub mod rpc;
pub mod runtime;
pub mod secret;
pub mod sync;
pub mod telemetry;
pub mod torch_ext;
pub mod train;
pub mod version;
