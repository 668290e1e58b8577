//! The dedicated OS thread that owns the model and optimizer. Libtorch work never runs on the
//! async runtime's workers; the learner actor talks to this thread through a channel.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tch::Tensor;
use tokio::sync::oneshot;

use crate::grpo::TrainBatch;
use crate::model::ParamStore;
use crate::train::{SharedWeights, StepMetrics, TrainError, Trainer};

/// Copies of the trainer's state at one step.
pub struct Snapshot {
    /// The model's weights (LoRA: merged, and only when asked for).
    pub weights: Vec<(String, Tensor)>,
    /// LoRA: the adapter's spec and tensors.
    pub adapter: Option<(crate::model::lora::LoraSpec, Vec<(String, Tensor)>)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub optimizer_steps: u64,
    pub skipped_steps: u64,
    pub steps_done: u64,
}

enum Command {
    Train(Box<TrainBatch>, oneshot::Sender<Result<StepMetrics, TrainError>>),
    /// A snapshot; the flag asks for the (merged) weights of a LoRA trainer too.
    Snapshot(bool, oneshot::Sender<Snapshot>),
    Weights(oneshot::Sender<(u64, Vec<(String, Tensor)>)>),
    /// Runs on the model thread with the trainer (between steps).
    With(Box<dyn FnOnce(&Trainer) + Send>),
    Share(oneshot::Sender<(ParamStore, SharedWeights)>),
}

/// The model thread stopped (it panicked, or was shut down).
#[derive(Debug, thiserror::Error)]
#[error("the model thread is gone")]
pub struct WorkerGone;

/// The model thread could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("cannot start the model thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the model thread died while loading")]
    Died,
}

/// Handle on the model thread.
pub struct ModelWorker {
    tx: Option<mpsc::Sender<Command>>,
    join: Option<JoinHandle<()>>,
}

impl ModelWorker {
    /// Starts the thread and builds the trainer on it; returns once it is ready.
    pub async fn start<F>(init: F) -> Result<(Self, u64), StartError>
    where
        F: FnOnce() -> Result<Trainer, TrainError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let join = std::thread::Builder::new()
            .name("grpo-model".into())
            .spawn(move || {
                let mut trainer = match init() {
                    Ok(t) => {
                        let _ = ready_tx.send(Ok(t.steps_done()));
                        t
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                serve(&mut trainer, &rx);
                // The run is over: the other learner ranks leave too.
                if let Err(e) = trainer.stop_ranks() {
                    tracing::warn!(error = %e, "could not tell the other learner ranks to stop");
                }
            })
            .map_err(StartError::Spawn)?;
        let steps = match ready_rx.await {
            Ok(Ok(steps)) => steps,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(StartError::Died),
        };
        Ok((
            Self {
                tx: Some(tx),
                join: Some(join),
            },
            steps,
        ))
    }

    fn send(&self, cmd: Command) -> Result<(), WorkerGone> {
        self.tx.as_ref().ok_or(WorkerGone)?.send(cmd).map_err(|_| WorkerGone)
    }

    /// Trains one step.
    pub async fn train(&self, batch: TrainBatch) -> Result<Result<StepMetrics, TrainError>, WorkerGone> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Train(Box::new(batch), tx))?;
        rx.await.map_err(|_| WorkerGone)
    }

    /// Copies of the weights only, with the step they belong to.
    pub async fn weights(&self) -> Result<(u64, Vec<(String, Tensor)>), WorkerGone> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Weights(tx))?;
        rx.await.map_err(|_| WorkerGone)
    }

    /// Runs `job` on the model thread between two steps and returns its result (for work
    /// that must be ordered against the optimizer's updates, like packing weights on the GPU).
    pub async fn with_trainer<T, F>(&self, job: F) -> Result<T, WorkerGone>
    where
        T: Send + 'static,
        F: FnOnce(&Trainer) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.send(Command::With(Box::new(move |t: &Trainer| {
            let _ = tx.send(job(t));
        })))?;
        rx.await.map_err(|_| WorkerGone)
    }

    /// Handles on the live parameters for a colocated engine (shared mode).
    pub async fn share(&self) -> Result<(ParamStore, SharedWeights), WorkerGone> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Share(tx))?;
        rx.await.map_err(|_| WorkerGone)
    }

    /// Copies weights and optimizer state (a LoRA trainer's adapter, and its merged weights
    /// only `with_weights`).
    pub async fn snapshot(&self, with_weights: bool) -> Result<Snapshot, WorkerGone> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Snapshot(with_weights, tx))?;
        rx.await.map_err(|_| WorkerGone)
    }
}

impl Drop for ModelWorker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// The model thread's loop: runs commands until every handle is gone; between commands an
/// idle trainer keeps the other data-parallel ranks alive and adopts a new home for shared
/// weights.
fn serve(trainer: &mut Trainer, rx: &mpsc::Receiver<Command>) {
    loop {
        // Data parallel: an idle rank 0 tells the other ranks it is alive. Shared
        // mode: an idle trainer adopts a new home for its weights.
        let cmd = match trainer.idle_every() {
            None => match rx.recv() {
                Ok(cmd) => cmd,
                Err(_) => break,
            },
            Some(every) => match rx.recv_timeout(every) {
                Ok(cmd) => cmd,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = trainer.keep_ranks_alive() {
                        tracing::error!(error = %e, "the other learner ranks are gone; the next step fails");
                    }
                    if let Err(e) = trainer.adopt_home() {
                        tracing::error!(error = %e, "adopting the shared engine's memory failed");
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        run_command(trainer, cmd);
    }
}

/// Runs one command on the model thread.
fn run_command(trainer: &mut Trainer, cmd: Command) {
    match cmd {
        Command::Train(batch, reply) => {
            let _ = reply.send(trainer.train(&batch));
        }
        Command::Snapshot(with_weights, reply) => {
            let (optimizer, optimizer_steps) = trainer.optimizer_state();
            let adapter = trainer.lora().cloned().zip(trainer.adapter_snapshot());
            let weights = if adapter.is_none() || with_weights {
                trainer.master_snapshot()
            } else {
                Vec::new()
            };
            let _ = reply.send(Snapshot {
                weights,
                adapter,
                optimizer,
                optimizer_steps,
                skipped_steps: trainer.skipped_steps(),
                steps_done: trainer.steps_done(),
            });
        }
        Command::Weights(reply) => {
            let _ = reply.send((trainer.steps_done(), trainer.master_snapshot()));
        }
        Command::With(job) => {
            // A job only reads the trainer: a panic in it is reported and the
            // thread goes on (the job's caller sees its reply channel close).
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&*trainer)));
            if let Err(panic) = ran {
                let what = crate::engine::core::panic_text(panic.as_ref());
                tracing::error!(panic = %what, "a job on the model thread panicked");
            }
        }
        Command::Share(reply) => {
            let _ = reply.send(trainer.share());
        }
    }
}
