//! The command line: debug mappings offline (`normalize`, `transform`, `validate`).

use clap::{Args, Parser, Subcommand};
use iomt_connector::config::{LogFormat, Settings};
use iomt_connector::deadletters;
use iomt_connector::engine::{self, Checked};
use iomt_connector::model::measurement::Measurement;
use iomt_connector::source::Source;
use iomt_connector::template::TemplateError;
use iomt_connector::template::device::DeviceMapping;
use iomt_connector::template::fhir::FhirMapping;
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
    /// The mapping debugger: a web page to edit both mappings and try messages (offline).
    #[command(after_help = STUDIO_HELP)]
    Studio(StudioArgs),
    /// Inspect the dead-letter queue, and put back what the current mappings now take.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
}

const STUDIO_HELP: &str = "\
Serves the mapping debugger on --listen (127.0.0.1 only by default): both mappings side by side with
every problem `validate` finds marked at its line as you type, device messages (pasted or uploaded,
bodies or whole envelopes), why each template did or did not match, the normalized measurements and
the Observations `transform` would write. Needs no broker and no FHIR server; nothing leaves the
machine. Save to files writes both mappings back to --device-mapping and --fhir-mapping once they
load (each atomically); a missing file is warned about at start. `run` serves the same page at
/debugger with http.debugger = true, where Apply writes the running service's files and reloads.

Example:
  iomt-connector studio --listen 127.0.0.1:8181   # then open http://127.0.0.1:8181/";

#[derive(Args)]
struct StudioArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8181")]
    listen: String,
    /// The device mapping the page opens with.
    #[arg(long, value_name = "FILE", default_value = "mappings/devicecontent.json")]
    device_mapping: PathBuf,
    /// The FHIR mapping the page opens with.
    #[arg(long, value_name = "FILE", default_value = "mappings/fhirmapping.json")]
    fhir_mapping: PathBuf,
    /// A folder of sample messages (*.json) the page offers.
    #[arg(long, value_name = "DIR", default_value = "mappings/messages")]
    messages: PathBuf,
    /// The token the page's requests must carry (Authorization: Bearer); required to listen on
    /// anything but a loopback address.
    #[arg(long, env = "IOMT_STUDIO_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
    /// A host name the page may be opened under besides localhost, 127.0.0.1 and [::1]
    /// (repeatable); any other Host header gets a 403 (DNS rebinding).
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_host: Vec<String>,
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// The dead-letter queue grouped by error kind: count and first error of each. Removes nothing.
    #[command(after_help = DEAD_LETTERS_LIST_HELP)]
    List(DeadLettersListArgs),
    /// Re-normalize dead letters with the current mappings and move those that pass back.
    #[command(after_help = DEAD_LETTERS_REDRIVE_HELP)]
    Redrive(DeadLettersRedriveArgs),
}

const DEAD_LETTERS_LIST_HELP: &str = "\
Reads the configured source's dead letters (settings as for `run`: --config FILE, then IOMT_*
variables): broker.dead_letter_queue, or with source.kind = \"eventhubs\" the events of
eventhubs.dead_letter_hub not yet redriven. Prints one line per kind (x-iomt-error-kind;
delivery-limit for messages the broker dead-lettered after broker.delivery_limit deliveries): the
count and the first message's x-iomt-error. Nothing is removed.

Example:
  iomt-connector dead-letters list --config config/default.toml";

const DEAD_LETTERS_REDRIVE_HELP: &str = "\
Takes every message of broker.dead_letter_queue (or only those of --kind), re-normalizes it with the
current mappings (mappings.device and mappings.fhir), and reports how many would now pass. Without
--dry-run, each one that passes is published back to the queue it came from (x-iomt-original-queue,
else broker.queue) without the dead-letter headers, and removed from the dead-letter queue only once
the broker has confirmed it. Those that would still fail stay, and are listed by the kind they would
fail with now. With source.kind = \"eventhubs\", passing events are sent back to eventhubs.hub and
recorded as redriven (events cannot be removed from a hub). Exit status 1 when a message that
passes could not be moved.

Example:
  iomt-connector dead-letters redrive --kind missing-value --dry-run
  iomt-connector dead-letters redrive --kind missing-value";

#[derive(Args)]
struct DeadLettersListArgs {
    /// Settings file (TOML), as for `run`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DeadLettersRedriveArgs {
    /// Settings file (TOML), as for `run`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Only dead letters of this x-iomt-error-kind (e.g. missing-value, identity-not-found).
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// Report what would pass; move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
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
Publisher confirms are kept --in-flight at a time. With broker.topology = \"sharded\" each message
goes to the consistent-hash exchange broker.queue with its device id as the routing key. A progress line goes to stderr; the summary
(sent, confirmed, refused, elapsed, rate) to stdout.

Example:
  iomt-connector simulate --devices 100 --rate 200 --duration 60 --profile vitals";

/// Where `publish` and `simulate` send: the settings' `[broker]` section, then these flags.
#[derive(Args)]
struct BrokerArgs {
    /// Broker URL (default: broker.url of the settings).
    #[arg(long)]
    url: Option<String>,
    /// Queue to publish to (default: broker.queue); declared as `run` declares it.
    #[arg(long)]
    queue: Option<String>,
    /// Settings file (TOML), as for `run`: its broker section applies.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Send to this event hub instead of a queue, with the settings' [eventhubs] credentials
    /// (connection_string or Entra, custom_endpoint). Each message's partition key is its device id.
    #[arg(long, value_name = "HUB")]
    eventhub: Option<String>,
}

impl BrokerArgs {
    /// Where to send: the event hub when `--eventhub` is given, else the queue.
    fn target(self) -> Result<Box<dyn Source>, Failure> {
        iomt_connector::source::registry::sending_to(self.config.as_deref(), self.eventhub, self.url, self.queue)
            .map_err(|e| Failure(2, format!("error: {e}")))
    }
}

#[derive(Args)]
struct SimulateArgs {
    #[command(flatten)]
    broker: BrokerArgs,
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
x-iomt-sent-at = now in epoch ms), with publisher confirms; the queues are declared first as `run`
declares them (broker.queue_type, quorum by default). With broker.topology = \"sharded\" the messages
go to the consistent-hash exchange broker.queue, routed by --routing-key (the device id).
Exit status 1 if the broker refuses any message.

Example:
  iomt-connector publish --queue iomt.devices mappings/messages/*.json";

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The device id to route by (broker.topology = "sharded"): the routing key the
    /// consistent-hash exchange hashes. Needed for the sharded topology.
    #[arg(long, value_name = "DEVICE_ID")]
    routing_key: Option<String>,
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

When the FHIR server is unavailable (network, timeout, 408, 429, 5xx), messages are held unacked and
retried until it answers; /health/ready says why. `iomt-connector dead-letters list|redrive` inspects
and re-drives the dead-letter queue. broker.topology = \"sharded\" spreads devices over shard queues
shared by several instances (see the README's Scale out).

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
        Command::Studio(a) => studio(a),
        Command::DeadLetters(DeadLettersCommand::List(a)) => dead_letters_list(a),
        Command::DeadLetters(DeadLettersCommand::Redrive(a)) => dead_letters_redrive(a),
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
    iomt_connector::template::located_all(errors, &path.display().to_string())
}

/// Loads a mapping pair (or a device mapping alone) through the engine, refusing it with every
/// problem located; exit status 2. Cross-check findings do not refuse a pair.
fn load(device: &Path, fhir: Option<&Path>) -> Result<(DeviceMapping, Option<FhirMapping>), Failure> {
    let fhir_text = fhir.map(read).transpose()?;
    let fhir_file = fhir.map(|p| p.display().to_string()).unwrap_or_default();
    let Checked { device: d, fhir: f, report } = engine::check(&read(device)?, fhir_text.as_deref(), &fhir_file);
    if !report.device.is_empty() {
        return Err(Failure(2, mapping_errors(device, &report.device)));
    }
    if let Some(path) = fhir.filter(|_| !report.fhir.is_empty()) {
        return Err(Failure(2, mapping_errors(path, &report.fhir)));
    }
    Ok((d, f))
}

fn load_device(path: &Path) -> Result<DeviceMapping, Failure> {
    load(path, None).map(|(d, _)| d)
}

fn load_pair(device: &Path, fhir: &Path) -> Result<(DeviceMapping, FhirMapping), Failure> {
    let (d, f) = load(device, Some(fhir))?;
    Ok((d, f.unwrap_or_default()))
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
    let (device, fhir) = load_pair(&a.device_mapping, &a.fhir_mapping)?;
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
    iomt_connector::service::run(settings, a.dry_run).map_err(|e| Failure(1, format!("error: {e}")))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Failure(2, format!("error: {e}")))
}

fn studio(a: StudioArgs) -> Result<(), Failure> {
    let loopback = match a.listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => a.listen.starts_with("localhost:"),
    };
    if !loopback && a.token.is_empty() {
        return Err(Failure(
            2,
            format!(
                "error: refusing to serve the mapping debugger on {} without --token (or IOMT_STUDIO_TOKEN): anyone who can reach it could read the mappings and samples; set a token, or listen on 127.0.0.1",
                a.listen
            ),
        ));
    }
    // Warned, not refused: Apply on the page can create them, and the page says it too.
    for why in iomt_connector::studio::missing(&a.device_mapping, &a.fhir_mapping) {
        eprintln!("warning: cannot read {why}; the editor opens empty (--device-mapping, --fhir-mapping)");
    }
    let studio = iomt_connector::studio::Studio {
        device: a.device_mapping,
        fhir: a.fhir_mapping,
        messages: a.messages,
        token: a.token,
        hosts: a.allow_host,
        session: iomt_connector::studio::new_session(),
        live: None,
    };
    iomt_connector::studio::serve(&a.listen, studio)
        .map_err(|e| Failure(1, format!("error: cannot serve on {} (--listen): {e}", a.listen)))
}

fn dead_letters_list(a: DeadLettersListArgs) -> Result<(), Failure> {
    let source = iomt_connector::source::registry::dead_letters_of(a.config.as_deref())
        .map_err(|e| Failure(2, format!("error: {e}")))?;
    let rt = runtime()?;
    let letters = rt.block_on(source.dead_letters()).map_err(|e| Failure(1, format!("error: {e}")))?;
    let (name, what) = (letters.name(), letters.what());
    let kinds = rt.block_on(deadletters::list(letters)).map_err(|e| Failure(1, format!("error: {e}")))?;
    if a.json {
        return print_json(&serde_json::json!({"queue": name, "kinds": kinds}));
    }
    let total: usize = kinds.iter().map(|k| k.count).sum();
    println!("{what} {name}: {total} message(s)");
    let width = kinds.iter().map(|k| k.kind.len()).max().unwrap_or(0);
    for k in &kinds {
        println!("  {:<width$}  {:>6}  first error: {}", k.kind, k.count, k.first_error);
    }
    Ok(())
}

fn dead_letters_redrive(a: DeadLettersRedriveArgs) -> Result<(), Failure> {
    let settings = Settings::load(a.config.as_deref()).map_err(|e| Failure(2, format!("error: {e}")))?;
    let (device, fhir) = load_pair(&settings.mappings.device, &settings.mappings.fhir)?;
    let source = iomt_connector::source::registry::configured(&settings);
    let rt = runtime()?;
    let letters = rt.block_on(source.dead_letters()).map_err(|e| Failure(1, format!("error: {e}")))?;
    let (name, what, back_to) = (letters.name(), letters.what(), letters.back_to());
    let r = rt
        .block_on(deadletters::redrive(letters, &device, &fhir, a.kind.as_deref(), a.dry_run))
        .map_err(|e| Failure(1, format!("error: {e}")))?;
    if a.json {
        print_json(&r)?;
    } else {
        let which = a.kind.as_deref().map(|k| format!(" of kind {k}")).unwrap_or_default();
        println!("{what} {name}: {} message(s), {} selected{which}", r.total, r.selected);
        println!("  would now pass the mappings: {}", r.pass);
        for k in &r.still_failing {
            println!("  would still fail: {} {} (first: {})", k.count, k.kind, k.first_error);
        }
        if a.dry_run {
            println!("dry run: nothing moved");
        } else {
            println!("moved {} back to {back_to}", r.moved);
        }
    }
    if r.not_moved.is_empty() {
        Ok(())
    } else {
        Err(Failure(1, format!("error: {} message(s) not moved: {}", r.not_moved.len(), r.not_moved[0])))
    }
}

fn publish(a: PublishArgs) -> Result<(), Failure> {
    let source = a.broker.target()?;
    let mut bodies = Vec::new();
    for p in &a.messages {
        bodies.push(std::fs::read(p).map_err(|e| Failure(2, format!("error: cannot read {}: {e}", p.display())))?);
    }
    runtime()?.block_on(async {
        let fail = |e: String| Failure(1, format!("error: {e}"));
        let mut p = source.publisher(256).await.map_err(fail)?;
        for body in &bodies {
            p.send(body, a.routing_key.as_deref()).await.map_err(fail)?;
        }
        p.flush().await.map_err(fail)?;
        let ((confirmed, refused), to) = (p.counts(), p.target());
        println!("published {} message(s) to {to}: {confirmed} confirmed, {refused} refused", bodies.len());
        if refused > 0 { Err(Failure(1, "error: some messages were refused".into())) } else { Ok(()) }
    })
}

fn simulate(a: SimulateArgs) -> Result<(), Failure> {
    use iomt_connector::simulate::{Plan, run};
    let duration = match (a.duration, a.count) {
        (Some(d), _) => Some(std::time::Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(std::time::Duration::from_secs(10)),
    };
    let target = a.broker.target()?;
    let plan = Plan {
        target,
        devices: a.devices,
        rate: a.rate,
        duration,
        count: a.count,
        profile: a.profile,
        prefix: a.prefix,
        in_flight: a.in_flight,
        progress: true,
    };
    let s = runtime()?.block_on(run(&plan)).map_err(|e| Failure(1, format!("error: {e}")))?;
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
    // Colours only on a terminal: a log file or collector gets plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn validate(a: ValidateArgs) -> Result<(), Failure> {
    let fhir_text = a.fhir_mapping.as_deref().map(read).transpose()?;
    let fhir_file = a.fhir_mapping.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let Checked { device, fhir, report } = engine::check(&read(&a.device_mapping)?, fhir_text.as_deref(), &fhir_file);
    let device_file = a.device_mapping.display().to_string();
    let mut problems = vec![mapping_errors(&a.device_mapping, &report.device)];
    let mut summary = vec![format!("{device_file}: {} device template(s)", device.templates.len())];
    if let (Some(path), Some(fhir)) = (&a.fhir_mapping, &fhir) {
        problems.push(mapping_errors(path, &report.fhir));
        problems.push(report.cross.iter().map(|e| e.located(&device_file)).collect::<Vec<_>>().join("\n"));
        summary.push(format!("{fhir_file}: {} FHIR template(s)", fhir.templates.len()));
    }
    for n in &report.notes {
        eprintln!("note: {}", n.located(&fhir_file));
    }
    let count = report.problem_count();
    if count > 0 {
        let problems: Vec<String> = problems.into_iter().filter(|p| !p.is_empty()).collect();
        return Err(Failure(1, format!("{}\n{count} problem(s) found", problems.join("\n"))));
    }
    println!("{}\nvalid", summary.join("\n"));
    Ok(())
}
