//! Python bindings of devft: the DevFT [`Server`](devft::federated::Server) and
//! [`Client`](devft::federated::Client) for Flower apps (module `devft_py`).
//!
//! Messages cross as `bytes` (devft's protocol: a JSON header and safetensors tensors),
//! tensors come out as numpy arrays, devft errors become typed Python exceptions under
//! `devft_py.DevftError`, a Rust panic is caught and raised as `DevftError` instead of
//! crossing the boundary, and training and aggregation run with the GIL released.
//!
//! ```python
//! import devft_py
//! settings = {"model": "tests/fixtures/tiny-llama", "data": "tests/fixtures/data/tiny_instructions.jsonl",
//!             "num-partitions": 2, "schedule": "2:2,8:2", "rounds": 4}
//! server = devft_py.Server(settings)
//! clients = [devft_py.Client(settings, p) for p in range(2)]
//! while not server.is_finished():
//!     round = server.configure_round()
//!     replies = [(t["client"], clients[t["client"]].train(t["setup"], t["task"]), None)
//!                for t in round["tasks"]]
//!     server.aggregate_round(replies)
//!     print(server.finish_round(True))
//! adapter = server.adapter()  # dict of numpy arrays
//! ```

mod settings;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard};

use burn::tensor::Device;
use devft::Error;
use devft::ParamMap;
use devft::data::TokenizedExample;
use devft::federated::protocol::{DeviceState, EvaluateTask, Message, StageSetup, TrainTask};
use devft::federated::{
    Client, Evaluation, FederatedRun, Server, StageModel, evaluate_loss, parse_memory_budgets,
};
use devft::fusion::LayerFuser;
use devft::model::CausalLm;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyString};

pub use settings::{KEYS, Settings, Value};

create_exception!(
    devft_py,
    DevftError,
    PyException,
    "Any error of devft; the subclasses name the kind."
);
create_exception!(
    devft_py,
    InvalidArgumentError,
    DevftError,
    "A setting or argument outside its domain."
);
create_exception!(
    devft_py,
    InvalidMessageError,
    DevftError,
    "A malformed, truncated, oversized or foreign protocol message."
);
create_exception!(
    devft_py,
    InvalidCheckpointError,
    DevftError,
    "A checkpoint inconsistent with itself or the run."
);
create_exception!(
    devft_py,
    IoError,
    DevftError,
    "A file could not be read or written."
);
create_exception!(
    devft_py,
    ModelError,
    DevftError,
    "A model, adapter or tensor that does not fit (config, shapes, names, values)."
);

/// The Python exception of a devft error.
fn to_py(error: Error) -> PyErr {
    let text = error.to_string();
    match error {
        Error::InvalidArgument(_) => InvalidArgumentError::new_err(text),
        Error::InvalidMessage { .. } | Error::RejectedUpdate { .. } => {
            InvalidMessageError::new_err(text)
        }
        Error::InvalidCheckpoint { .. } => InvalidCheckpointError::new_err(text),
        Error::Io { .. } | Error::Fetch { .. } => IoError::new_err(text),
        _ => ModelError::new_err(text),
    }
}

/// Runs `f`, turning a devft error into its Python exception and a panic into `DevftError`.
fn guarded<T>(f: impl FnOnce() -> devft::Result<T>) -> PyResult<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(to_py),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(DevftError::new_err(format!(
                "internal error in devft (please report it): {message}"
            )))
        }
    }
}

/// Locks `mutex`; a mutex poisoned by an earlier internal error is an error, not a panic.
fn lock<T>(mutex: &Mutex<T>) -> PyResult<MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| DevftError::new_err("this object is unusable after an earlier internal error"))
}

/// Settings from a Python dict of str, int, float or bool values.
fn settings_from(dict: &Bound<'_, PyDict>) -> PyResult<Settings> {
    let mut values = BTreeMap::new();
    for (key, value) in dict.iter() {
        let key: String = key.extract()?;
        let value = if value.is_instance_of::<PyBool>() {
            Value::Bool(value.extract()?)
        } else if value.is_instance_of::<PyInt>() {
            Value::Int(value.extract()?)
        } else if value.is_instance_of::<PyFloat>() {
            Value::Float(value.extract()?)
        } else if value.is_instance_of::<PyString>() {
            Value::Text(value.extract()?)
        } else {
            return Err(InvalidArgumentError::new_err(format!(
                "the setting `{key}` must be a str, int, float or bool"
            )));
        };
        values.insert(key, value);
    }
    guarded(|| Settings::new(values))
}

/// The inference device (the default backend) and its autodiff twin for training.
fn devices() -> devft::Result<(Device, Device)> {
    let device = devft::device::default_device()?;
    let train = device.clone().autodiff();
    Ok((device, train))
}

/// A tensor map as a dict of float32 numpy arrays of their shapes.
fn to_numpy<'py>(py: Python<'py>, params: ParamMap) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, tensor) in params {
        let shape = tensor.shape().to_vec();
        let array = PyArray1::from_vec(py, tensor.into_values()).reshape(shape)?;
        dict.set_item(name, array)?;
    }
    Ok(dict)
}

/// What the server object holds.
struct ServerState {
    server: Server,
    settings: Settings,
    eval: Vec<TokenizedExample>,
}

/// The DevFT server of a run: stage plan, grouping and fusion, the global adapter, the
/// aggregator; one round is `configure_round`, `aggregate_round`, `finish_round`.
#[pyclass(name = "Server", module = "devft_py")]
struct PyServer {
    /// Boxed: devft's state holds over-aligned values (64-byte cache padding), which a Python
    /// object's memory cannot hold in place.
    state: Mutex<Box<ServerState>>,
}

#[pymethods]
impl PyServer {
    /// Builds the server from the run's settings: loads the model and the held-out split.
    #[new]
    fn new(py: Python<'_>, settings: &Bound<'_, PyDict>) -> PyResult<Self> {
        let settings = settings_from(settings)?;
        let state = py.detach(|| {
            guarded(|| {
                let (device, _) = devices()?;
                let (eval, clients) = settings.data()?;
                let aggregator = settings.aggregator()?;
                if aggregator.client_instructions().keeps_any() {
                    // Its evaluation and stage transfer need every client's own B, which no
                    // message brings to the server yet.
                    return Err(Error::InvalidArgument(format!(
                        "{} keeps tensors on clients that the server needs at a stage's end; \
                         it runs in process only (FederatedRun)",
                        aggregator.name()
                    )));
                }
                let mut server = Server::new(
                    settings.federated_config()?,
                    settings.strategy()?,
                    aggregator,
                    settings.model(&device)?,
                    clients.len(),
                )?;
                for (client, budget) in settings.memory_budgets()?.into_iter().enumerate() {
                    server.declare_memory_budget(client, budget)?;
                }
                Ok(Box::new(ServerState {
                    server,
                    settings,
                    eval,
                }))
            })
        })?;
        Ok(Self {
            state: Mutex::new(state),
        })
    }

    /// Records the training memory `client` declared, in bytes (`None`: no limit): from the
    /// next round on it is sampled only in stages whose memory estimate fits, and the round's
    /// metrics list it under `clients_excluded` otherwise.
    #[pyo3(signature = (client, budget_bytes))]
    fn declare_memory_budget(&self, client: usize, budget_bytes: Option<u64>) -> PyResult<()> {
        let mut state = lock(&self.state)?;
        guarded(|| state.server.declare_memory_budget(client, budget_bytes))
    }

    /// Whether every stage is done.
    fn is_finished(&self) -> PyResult<bool> {
        Ok(lock(&self.state)?.server.is_finished())
    }

    /// Starts the next round: `{"round", "stage", "capacity", "tasks": [{"client", "setup"
    /// (bytes or None), "task" (bytes), "max_reply_bytes"}]}`.
    fn configure_round<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let tasks = py.detach(|| {
            let mut state = lock(&self.state)?;
            guarded(|| state.server.configure_round())
        })?;
        let out = PyDict::new(py);
        out.set_item("round", tasks.round)?;
        out.set_item("stage", tasks.stage)?;
        out.set_item("capacity", tasks.capacity)?;
        let list = tasks
            .tasks
            .into_iter()
            .map(|task| -> PyResult<Bound<'py, PyDict>> {
                let item = PyDict::new(py);
                item.set_item("client", task.client)?;
                item.set_item("setup", task.setup.map(|b| PyBytes::new(py, &b)))?;
                item.set_item("task", PyBytes::new(py, &task.task))?;
                item.set_item("max_reply_bytes", task.max_reply_bytes)?;
                Ok(item)
            })
            .collect::<PyResult<Vec<_>>>()?;
        out.set_item("tasks", list)?;
        Ok(out)
    }

    /// Takes the replies `(client, reply bytes or None, reason or None)`; a missing or bad
    /// reply is a failed client, never an exception. Returns the round's metrics as JSON.
    fn aggregate_round(
        &self,
        py: Python<'_>,
        replies: Vec<(usize, Option<Vec<u8>>, Option<String>)>,
    ) -> PyResult<String> {
        let replies: Vec<(usize, Result<Vec<u8>, String>)> = replies
            .into_iter()
            .map(|(client, bytes, reason)| {
                let reply = bytes.ok_or_else(|| reason.unwrap_or_else(|| "no reply".into()));
                (client, reply)
            })
            .collect();
        py.detach(|| {
            let mut state = lock(&self.state)?;
            guarded(|| {
                let metrics = state.server.aggregate_round(replies)?;
                Ok(serde_json::to_string(metrics).expect("metrics serialise"))
            })
        })
    }

    /// Closes the round, after a central held-out evaluation when `evaluate`; returns the
    /// round's metrics as JSON.
    fn finish_round(&self, py: Python<'_>, evaluate: bool) -> PyResult<String> {
        py.detach(|| {
            let mut state = lock(&self.state)?;
            guarded(|| {
                let evaluation = if evaluate {
                    let started = std::time::Instant::now();
                    let model = state.server.evaluation_model(&[])?;
                    let batch = state.settings.federated_config()?.eval_batch_size;
                    let loss = evaluate_loss(&model, &state.eval, batch, 0)?;
                    Some(Evaluation {
                        loss,
                        seconds: started.elapsed().as_secs_f64(),
                    })
                } else {
                    None
                };
                let metrics = state.server.finish_round(evaluation, &[])?;
                Ok(serde_json::to_string(&metrics).expect("metrics serialise"))
            })
        })
    }

    /// Every round's metrics so far, as a JSON list.
    fn metrics_json(&self) -> PyResult<String> {
        let state = lock(&self.state)?;
        Ok(serde_json::to_string(state.server.metrics()).expect("metrics serialise"))
    }

    /// The communication ledger so far, as JSON.
    fn ledger_json(&self) -> PyResult<String> {
        let state = lock(&self.state)?;
        Ok(serde_json::to_string(state.server.ledger()).expect("ledger serialises"))
    }

    /// The settings in use (defaults filled in), as JSON.
    fn settings_json(&self) -> PyResult<String> {
        Ok(lock(&self.state)?.settings.to_json().to_string())
    }

    /// The full model's adapter carrying everything learned: a dict of float32 arrays.
    fn adapter<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let params = {
            let state = lock(&self.state)?;
            guarded(|| Ok(state.server.model()?.lora_params()))?
        };
        to_numpy(py, params)
    }

    /// Writes the full model's adapter to a safetensors file.
    fn save_adapter(&self, py: Python<'_>, path: String) -> PyResult<()> {
        py.detach(|| {
            let state = lock(&self.state)?;
            guarded(|| state.server.model()?.lora_params().save_safetensors(&path))
        })
    }
}

/// What the client object holds.
struct ClientState {
    client: Client,
    stage: Option<StageModel>,
    parts: ClientParts,
}

/// What a client's device holds besides the stage.
struct ClientParts {
    base: CausalLm,
    fuser: Box<dyn LayerFuser>,
    held_out: Vec<TokenizedExample>,
    train_device: Device,
}

/// Builds the stage from `setup` when it brings one `held` is not; the stage to work on.
fn set_up<'a>(
    held: &'a mut Option<StageModel>,
    parts: &ClientParts,
    setup: Option<&[u8]>,
) -> devft::Result<&'a mut StageModel> {
    if let Some(bytes) = setup {
        let setup = StageSetup::from_bytes(bytes, usize::MAX, "server")?;
        if held.as_ref().map(StageModel::stage) != Some(setup.stage) {
            *held = Some(StageModel::build(
                &parts.base,
                &setup,
                parts.fuser.as_ref(),
            )?);
        }
    }
    held.as_mut().ok_or_else(|| {
        Error::InvalidArgument("no stage is set up on this client; send its set-up".into())
    })
}

/// One client of a run: its partition of the data, its copy of the base model, the stage
/// it holds; trains and evaluates on the server's messages.
#[pyclass(name = "Client", module = "devft_py")]
struct PyClient {
    /// Boxed, as [`PyServer`]'s state.
    state: Mutex<Box<ClientState>>,
}

#[pymethods]
impl PyClient {
    /// Client `partition_id` of the run's settings: loads the model and its partition, and,
    /// given the bytes of an earlier `state()`, restarts from it (the stage rebuilt, its
    /// merges replayed, the client's kept tensors back).
    #[new]
    #[pyo3(signature = (settings, partition_id, state = None))]
    fn new(
        py: Python<'_>,
        settings: &Bound<'_, PyDict>,
        partition_id: usize,
        state: Option<Vec<u8>>,
    ) -> PyResult<Self> {
        let settings = settings_from(settings)?;
        let state = py.detach(|| {
            guarded(|| {
                let partitions = settings.num_partitions()?;
                if partition_id >= partitions {
                    return Err(Error::InvalidArgument(format!(
                        "partition {partition_id} of {partitions} does not exist"
                    )));
                }
                let (device, train_device) = devices()?;
                let (eval, mut clients) = settings.data()?;
                let held_out = eval
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| i % partitions == partition_id)
                    .map(|(_, e)| e)
                    .collect();
                let examples = clients.swap_remove(partition_id);
                let base = settings.model(&device)?;
                let fuser = settings.strategy()?.fuser;
                let (client, stage) = match state {
                    Some(bytes) => {
                        let state = DeviceState::from_bytes(&bytes, usize::MAX, "saved state")?;
                        let (client, stage) =
                            Client::restore(partition_id, examples, state, &base, fuser.as_ref())?;
                        (client, Some(stage))
                    }
                    None => (Client::new(partition_id, examples), None),
                };
                Ok(Box::new(ClientState {
                    client,
                    stage,
                    parts: ClientParts {
                        base,
                        fuser,
                        held_out,
                        train_device,
                    },
                }))
            })
        })?;
        Ok(Self {
            state: Mutex::new(state),
        })
    }

    /// Trains on a task (with the stage's set-up when the server sent one) and returns the
    /// reply message. Runs without the GIL.
    #[pyo3(signature = (setup, task))]
    fn train<'py>(
        &self,
        py: Python<'py>,
        setup: Option<Vec<u8>>,
        task: Vec<u8>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        // A malformed task is reported as such, before any stage is looked at.
        let task = guarded(|| TrainTask::from_bytes(&task, usize::MAX, "server"))?;
        self.on_stage(py, setup, move |client, stage, parts| {
            client.train(stage, &task, &parts.train_device)?.to_bytes()
        })
    }

    /// Evaluates on the client's share of the held-out examples and returns the reply.
    #[pyo3(signature = (setup, task))]
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        setup: Option<Vec<u8>>,
        task: Vec<u8>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let task = guarded(|| EvaluateTask::from_bytes(&task, usize::MAX, "server"))?;
        self.on_stage(py, setup, move |client, stage, parts| {
            client.evaluate(stage, &task, &parts.held_out)?.to_bytes()
        })
    }

    /// What the client holds (the stage's set-up, the merges applied, its kept tensors), as
    /// bytes to restart from with `Client(settings, partition_id, state)`; `None` before
    /// its first stage. Local: never sent, never counted.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let bytes = py.detach(|| {
            let state = lock(&self.state)?;
            guarded(|| {
                state
                    .stage
                    .as_ref()
                    .map(|stage| state.client.state(stage).to_bytes())
                    .transpose()
            })
        })?;
        Ok(bytes.map(|b| PyBytes::new(py, &b)))
    }
}

impl PyClient {
    /// Runs `work` on the client and its stage (set up first from `setup` when the server
    /// sent one) without the GIL, and returns the message it writes.
    fn on_stage<'py>(
        &self,
        py: Python<'py>,
        setup: Option<Vec<u8>>,
        work: impl FnOnce(&mut Client, &mut StageModel, &ClientParts) -> devft::Result<Vec<u8>> + Send,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let reply = py.detach(|| {
            let mut state = lock(&self.state)?;
            guarded(|| {
                let ClientState {
                    client,
                    stage,
                    parts,
                } = &mut **state;
                let stage = set_up(stage, parts, setup.as_deref())?;
                work(client, stage, parts)
            })
        })?;
        Ok(PyBytes::new(py, &reply))
    }
}

/// The same run in one process (`FederatedRun`), for comparison with a deployment:
/// `{"adapter": dict of arrays, "ledger": JSON, "metrics": JSON}`.
#[pyfunction]
fn run_in_process<'py>(
    py: Python<'py>,
    settings: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyDict>> {
    let settings = settings_from(settings)?;
    let outcome = py.detach(|| {
        guarded(|| {
            let (device, train_device) = devices()?;
            let (eval, clients) = settings.data()?;
            FederatedRun::new(
                settings.federated_config()?,
                settings.strategy()?,
                settings.aggregator()?,
                clients,
                eval,
            )?
            .with_memory_budgets(settings.memory_budgets()?)?
            .run(settings.model(&device)?, &train_device)
        })
    })?;
    let out = PyDict::new(py);
    out.set_item("adapter", to_numpy(py, outcome.model.lora_params())?)?;
    out.set_item(
        "ledger",
        serde_json::to_string(&outcome.ledger).expect("ledger serialises"),
    )?;
    out.set_item(
        "metrics",
        serde_json::to_string(&outcome.metrics).expect("metrics serialise"),
    )?;
    Ok(out)
}

/// One memory budget in bytes from its text (`640M`, `1.5G`, `1048576`; `none` or an empty
/// text: `None`, no limit), as an entry of the `client-memory` setting or a SuperNode's
/// `memory-budget` node config is read.
#[pyfunction]
fn parse_memory_budget(text: &str) -> PyResult<Option<u64>> {
    // One client: the list is that one entry (or empty), never another length.
    guarded(|| Ok(parse_memory_budgets(text, 1)?[0]))
}

/// The `devft_py` module.
#[pymodule]
fn devft_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyServer>()?;
    m.add_class::<PyClient>()?;
    m.add_function(wrap_pyfunction!(run_in_process, m)?)?;
    m.add_function(wrap_pyfunction!(parse_memory_budget, m)?)?;
    m.add("DevftError", py.get_type::<DevftError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    m.add("InvalidMessageError", py.get_type::<InvalidMessageError>())?;
    m.add(
        "InvalidCheckpointError",
        py.get_type::<InvalidCheckpointError>(),
    )?;
    m.add("IoError", py.get_type::<IoError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add(
        "PROTOCOL_VERSION",
        devft::federated::protocol::PROTOCOL_VERSION,
    )?;
    Ok(())
}
