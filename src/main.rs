//! The command line: debug mappings offline (`normalize`, `transform`, `validate`).

use clap::{Args, Parser, Subcommand};
use iomt_connector::config::{LogFormat, Settings};
use iomt_connector::model::measurement::Measurement;
use iomt_connector::source::rabbitmq::Publisher;
use iomt_connector::template::device::DeviceMapping;
use iomt_connector::template::fhir::{FhirMapping, PeriodInterval, ValueKind};
use iomt_connector::template::{TemplateError, TemplateErrors};
use iomt_connector::transform::{CreateIdentity, transform};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "iomt-connector",
    version,
    about = "Device messages to FHIR R4 Observations, with Azure MedTech mapping files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the measurements a device mapping projects out of one message.
    #[command(after_help = NORMALIZE_HELP)]
    Normalize(NormalizeArgs),
    /// Print the Observations a batch of messages becomes (Create identity, empty FHIR server).
    #[command(after_help = TRANSFORM_HELP)]
    Transform(TransformArgs),
    /// Check a device mapping (and a FHIR mapping) and report every problem with its position.
    #[command(after_help = VALIDATE_HELP)]
    Validate(ValidateArgs),
    /// Run the service: consume device messages from RabbitMQ and write Observations to FHIR.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Publish message files to a RabbitMQ queue (one file, one message).
    #[command(after_help = PUBLISH_HELP)]
    Publish(PublishArgs),
    /// Simulate devices: publish realistic messages for the sample mappings at a set rate.
    #[command(after_help = SIMULATE_HELP)]
    Simulate(SimulateArgs),
}

const SIMULATE_HELP: &str = "\
Profiles match mappings/devicecontent.json:
  vitals  heart rate and SpO2 readings, alternating per device (1 Hz streams when
          --rate = 2 x --devices): SampledData windows, few devices, many readings
  spot    blood pressure, glucose (epoch-ms timestamp) and temperature spot readings:
          instant Observations, many devices, one reading each
  mixed   both, interleaved
Devices are {prefix}-dev-N with patients {prefix}-pat-N; readings are stamped with the current
time, and each message with header x-iomt-sent-at (epoch ms) for the end-to-end delay metric.
Publisher confirms are kept --in-flight at a time. A progress line goes to stderr; the summary
(sent, confirmed, refused, elapsed, rate) to stdout.

Example:
  iomt-connector simulate --devices 100 --rate 200 --duration 60 --profile vitals";

#[derive(Args)]
struct SimulateArgs {
    #[arg(long, env = "IOMT_BROKER__URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    #[arg(long, env = "IOMT_BROKER__QUEUE", default_value = "iomt.devices")]
    queue: String,
    /// Distinct devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Messages per second in total (0: as fast as the broker confirms).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds to run (default: until --count, or 10 s).
    #[arg(long)]
    duration: Option<f64>,
    /// Messages to send.
    #[arg(long)]
    count: Option<u64>,
    #[arg(long, value_enum, default_value = "vitals")]
    profile: iomt_connector::simulate::Profile,
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Unconfirmed messages allowed in flight.
    #[arg(long, default_value_t = 1000)]
    in_flight: usize,
}

const PUBLISH_HELP: &str = "\
Each MESSAGE_FILE is sent as one persistent message (content-type application/json, header
x-iomt-sent-at = now in epoch ms), with publisher confirms; the queue is declared (durable) first.
Exit status 1 if the broker refuses any message.

Example:
  iomt-connector publish --queue iomt.devices mappings/messages/*.json";

#[derive(Args)]
struct PublishArgs {
    /// Broker URL.
    #[arg(long, env = "IOMT_BROKER__URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Queue to publish to.
    #[arg(long, env = "IOMT_BROKER__QUEUE", default_value = "iomt.devices")]
    queue: String,
    #[arg(value_name = "MESSAGE_FILE", required = true)]
    messages: Vec<PathBuf>,
}

const RUN_HELP: &str = "\
Settings come from config/default.toml's values, then --config FILE, then environment variables
IOMT_<SECTION>__<KEY> (e.g. IOMT_BROKER__QUEUE=devices, IOMT_FHIR__BASE_URL=http://fhir/r4,
IOMT_IDENTITY__MODE=Lookup). A bad value stops the start with a message naming the key.

A message is acked only once every Observation derived from it is written, or it is dead-lettered
(exchange broker.dead_letter_exchange, headers x-iomt-error-kind and x-iomt-error). SIGTERM or
SIGINT: stop consuming, flush, wait for the writes and acks, exit 0.

HTTP (http.listen): /health/live, /health/ready, /actors, /metrics.

Example:
  IOMT_BROKER__QUEUE=devices iomt-connector run --config config/default.toml";

#[derive(Args)]
struct RunArgs {
    /// Settings file (TOML); defaults apply to what it leaves out.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Normalize, group and build Observations, but write nothing to FHIR (measures the pipeline).
    #[arg(long)]
    dry_run: bool,
}

const NORMALIZE_HELP: &str = "\
Prints a JSON array of measurements to stdout:
  {\"type\", \"occurrenceTimeUtc\", \"deviceId\", \"patientId\", \"encounterId\", \"correlationId\",
   \"properties\": [{\"name\", \"value\"}]}
in template order, then match order; absent ids are null; times are RFC 3339 UTC with milliseconds.

Without --envelope, MESSAGE_FILE is the message body and is evaluated as
  {\"Body\": <file>, \"Properties\": {}, \"SystemProperties\": {}}
With --envelope, MESSAGE_FILE is that whole envelope (use it for IotJsonPathContent templates).

Exit status: 0 with the array (possibly []), 1 when the message cannot be normalized (not JSON, a
required value missing, an expression failing: one line on stderr names the template's typeName,
the expression and the reason), 2 when the mapping is invalid or a file cannot be read.

Example:
  iomt-connector normalize --device-mapping mappings/devicecontent.json mappings/messages/heartrate.json";

const TRANSFORM_HELP: &str = "\
Normalizes every MESSAGE_FILE in order as one batch, groups the measurements per device, type,
patient, encounter, correlation id and window, and prints the JSON array of FHIR R4 Observations
that Create-mode identity would write to an empty FHIR server: Patient and Device ids are derived
from the message's patientId and deviceId (sha256 of \"{system}_{value}\"). Readings with equal
timestamps: the later file wins. `issued` is the current time.

Exit status: 0 when every message and group converts; 1 when any fails (each failure is one line on
stderr; the Observations that did convert are still printed); 2 for invalid mappings or unreadable
files.

Example:
  iomt-connector transform --device-mapping mappings/devicecontent.json \\
      --fhir-mapping mappings/fhirmapping.json mappings/messages/heartrate.json mappings/messages/spo2.json";

const VALIDATE_HELP: &str = "\
Exits 0 and prints a summary when the mappings are valid; otherwise exits 1 and lists every problem
as FILE:LINE:COLUMN: message, including cross-checks between the two mappings (a device typeName
without a FHIR template; a device value name no FHIR template uses).

Example:
  iomt-connector validate --device-mapping mappings/devicecontent.json --fhir-mapping mappings/fhirmapping.json";

#[derive(Args)]
struct NormalizeArgs {
    /// Device mapping (MedTech CollectionContent JSON).
    #[arg(long, value_name = "FILE")]
    device_mapping: PathBuf,
    /// MESSAGE_FILE holds the whole {Body, Properties, SystemProperties} envelope.
    #[arg(long)]
    envelope: bool,
    /// The device message (its body, or the envelope with --envelope).
    #[arg(value_name = "MESSAGE_FILE")]
    message: PathBuf,
}

#[derive(Args)]
struct TransformArgs {
    /// Device mapping (MedTech CollectionContent JSON).
    #[arg(long, value_name = "FILE")]
    device_mapping: PathBuf,
    /// FHIR mapping (MedTech CollectionFhir JSON).
    #[arg(long, value_name = "FILE")]
    fhir_mapping: PathBuf,
    /// Each MESSAGE_FILE holds a whole {Body, Properties, SystemProperties} envelope.
    #[arg(long)]
    envelope: bool,
    /// Identifier system of Device resources (MedTech's DefaultDeviceIdentifierSystem).
    #[arg(long, value_name = "URI")]
    device_identifier_system: Option<String>,
    /// Device messages, in ingestion order.
    #[arg(value_name = "MESSAGE_FILE", required = true)]
    messages: Vec<PathBuf>,
}

#[derive(Args)]
struct ValidateArgs {
    /// Device mapping (MedTech CollectionContent JSON).
    #[arg(long, value_name = "FILE")]
    device_mapping: PathBuf,
    /// FHIR mapping (MedTech CollectionFhir JSON); enables the cross-checks.
    #[arg(long, value_name = "FILE")]
    fhir_mapping: Option<PathBuf>,
}

/// A failure that ends the command: its exit code and what to print on stderr.
struct Failure(u8, String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Normalize(a) => normalize(a),
        Command::Transform(a) => transform_cmd(a),
        Command::Validate(a) => validate(a),
        Command::Run(a) => run(a),
        Command::Publish(a) => publish(a),
        Command::Simulate(a) => simulate(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("{message}");
            ExitCode::from(code)
        }
    }
}

fn read(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| Failure(2, format!("error: cannot read {}: {e}", path.display())))
}

fn mapping_errors(path: &Path, errors: &[TemplateError]) -> String {
    let file = path.display().to_string();
    errors.iter().map(|e| e.located(&file)).collect::<Vec<_>>().join("\n")
}

fn load_device(path: &Path) -> Result<DeviceMapping, Failure> {
    DeviceMapping::parse(&read(path)?).map_err(|TemplateErrors(e)| Failure(2, mapping_errors(path, &e)))
}

fn load_fhir(path: &Path) -> Result<FhirMapping, Failure> {
    FhirMapping::parse(&read(path)?).map_err(|TemplateErrors(e)| Failure(2, mapping_errors(path, &e)))
}

fn normalize_file(mapping: &DeviceMapping, path: &Path, whole_envelope: bool) -> Result<Vec<Measurement>, Failure> {
    let bytes = std::fs::read(path).map_err(|e| Failure(2, format!("error: cannot read {}: {e}", path.display())))?;
    let result = if whole_envelope { mapping.normalize_event_bytes(&bytes) } else { mapping.normalize_body(&bytes) };
    result.map_err(|e| Failure(1, format!("error: {}: {e}", path.display())))
}

fn print_json(v: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Failure(2, format!("error: {e}")))?;
    println!("{text}");
    Ok(())
}

fn normalize(a: NormalizeArgs) -> Result<(), Failure> {
    let mapping = load_device(&a.device_mapping)?;
    let measurements = normalize_file(&mapping, &a.message, a.envelope)?;
    print_json(&measurements)
}

fn transform_cmd(a: TransformArgs) -> Result<(), Failure> {
    let device = load_device(&a.device_mapping)?;
    let fhir = load_fhir(&a.fhir_mapping)?;
    let mut measurements = Vec::new();
    for path in &a.messages {
        measurements.extend(normalize_file(&device, path, a.envelope)?);
    }
    let identity = CreateIdentity { device_system: a.device_identifier_system };
    let batch = transform(&fhir, measurements, &identity, chrono::Utc::now());
    print_json(&batch.observations)?;
    if batch.errors.is_empty() {
        Ok(())
    } else {
        Err(Failure(1, batch.errors.iter().map(|e| format!("error: {e}")).collect::<Vec<_>>().join("\n")))
    }
}

fn run(a: RunArgs) -> Result<(), Failure> {
    let settings = Settings::load(a.config.as_deref()).map_err(|e| Failure(2, format!("error: {e}")))?;
    init_logging(&settings.log);
    iomt_connector::pipeline::run(settings, a.dry_run).map_err(|e| Failure(1, format!("error: {e}")))
}

fn publish(a: PublishArgs) -> Result<(), Failure> {
    let mut bodies = Vec::new();
    for p in &a.messages {
        bodies.push(std::fs::read(p).map_err(|e| Failure(2, format!("error: cannot read {}: {e}", p.display())))?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(2, format!("error: {e}")))?;
    rt.block_on(async {
        let fail = |e: lapin::Error| Failure(1, format!("error: broker {}: {e}", a.url));
        let mut p = Publisher::connect(&a.url, &a.queue, 256).await.map_err(fail)?;
        for b in &bodies {
            p.send(b).await.map_err(fail)?;
        }
        p.flush().await.map_err(fail)?;
        println!(
            "published {} message(s) to {}: {} confirmed, {} refused",
            bodies.len(),
            a.queue,
            p.confirmed,
            p.refused
        );
        if p.refused > 0 { Err(Failure(1, "error: the broker refused some messages".into())) } else { Ok(()) }
    })
}

fn simulate(a: SimulateArgs) -> Result<(), Failure> {
    use iomt_connector::simulate::{Plan, run};
    let duration = match (a.duration, a.count) {
        (Some(d), _) => Some(std::time::Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(std::time::Duration::from_secs(10)),
    };
    let plan = Plan {
        url: a.url.clone(),
        queue: a.queue,
        devices: a.devices,
        rate: a.rate,
        duration,
        count: a.count,
        profile: a.profile,
        prefix: a.prefix,
        in_flight: a.in_flight,
        progress: true,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(2, format!("error: {e}")))?;
    let s = rt.block_on(run(&plan)).map_err(|e| Failure(1, format!("error: broker {}: {e}", a.url)))?;
    println!(
        "sent {}, confirmed {}, refused {}, elapsed {:.2} s, rate {:.0} msg/s",
        s.sent,
        s.confirmed,
        s.refused,
        s.elapsed.as_secs_f64(),
        s.rate()
    );
    if s.refused > 0 { Err(Failure(1, "error: the broker refused some messages".into())) } else { Ok(()) }
}

fn init_logging(log: &iomt_connector::config::Log) {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn validate(a: ValidateArgs) -> Result<(), Failure> {
    let device_text = read(&a.device_mapping)?;
    let (device, device_errors) = DeviceMapping::parse_partial(&device_text);
    let mut problems = mapping_errors(&a.device_mapping, &device_errors);
    let mut summary = vec![format!("{}: {} device template(s)", a.device_mapping.display(), device.templates.len())];
    let mut notes = Vec::new();
    let mut count = device_errors.len();
    if let Some(fhir_path) = &a.fhir_mapping {
        let (fhir, fhir_errors) = FhirMapping::parse_partial(&read(fhir_path)?);
        count += fhir_errors.len();
        let mut cross = Vec::new();
        // Cross-checks only make sense when the FHIR mapping itself is sound.
        if fhir_errors.is_empty() {
            for t in &device.templates {
                let pos = |line, column| format!("{}:{line}:{column}", a.device_mapping.display());
                let Some(ft) = fhir.template(&t.type_name) else {
                    cross.push(format!(
                        "{}: {} '{}': no FHIR template has this typeName; add a CodeValueFhir with typeName '{}' to {}",
                        pos(t.line, t.column),
                        t.kind.name(),
                        t.type_name,
                        t.type_name,
                        fhir_path.display()
                    ));
                    continue;
                };
                for v in &t.values {
                    if !ft.value_templates().any(|fv| *fv.value_name == *v.name) {
                        cross.push(format!(
                            "{}: {} '{}': value '{}' is not used by FHIR template '{}' ({}:{}); it would be dropped",
                            pos(v.line, v.column),
                            t.kind.name(),
                            t.type_name,
                            v.name,
                            ft.type_name,
                            fhir_path.display(),
                            ft.line
                        ));
                    }
                }
            }
            for ft in &fhir.templates {
                if ft.effective_interval() != ft.period_interval && ft.period_interval != PeriodInterval::Single {
                    let kinds: Vec<&str> = ft
                        .value_templates()
                        .filter(|v| matches!(v.kind, ValueKind::Quantity { .. } | ValueKind::String))
                        .map(|v| v.kind.name())
                        .collect();
                    notes.push(format!(
                        "note: {}:{}:{}: CodeValueFhir '{}' has {} values, which hold one reading: each reading becomes its own instant Observation (periodInterval {:?} is not used)",
                        fhir_path.display(),
                        ft.line,
                        ft.column,
                        ft.type_name,
                        kinds.join("/"),
                        ft.period_interval
                    ));
                }
            }
        }
        count += cross.len();
        let fhir_problems = mapping_errors(fhir_path, &fhir_errors);
        for p in [fhir_problems, cross.join("\n")] {
            if !p.is_empty() {
                if !problems.is_empty() {
                    problems.push('\n');
                }
                problems.push_str(&p);
            }
        }
        summary.push(format!("{}: {} FHIR template(s)", fhir_path.display(), fhir.templates.len()));
    }
    for n in &notes {
        eprintln!("{n}");
    }
    if count > 0 {
        return Err(Failure(1, format!("{problems}\n{count} problem(s) found")));
    }
    println!("{}\nvalid", summary.join("\n"));
    Ok(())
}
