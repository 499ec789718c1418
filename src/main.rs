//! The command line: the service (`run`), its operators' tools (`config`, `health`,
//! `dead-letters`, `publish`, `simulate`) and the offline mapping tools (`normalize`,
//! `transform`, `validate`, `studio`).

use clap::{Args, CommandFactory, Parser, Subcommand};
use iomt_connector::config::{IdentityMode, LogFormat, Settings};
use iomt_connector::deadletters;
use iomt_connector::engine::{self, Checked};
use iomt_connector::model::measurement::Measurement;
use iomt_connector::source::Source;
use iomt_connector::template::TemplateError;
use iomt_connector::template::device::DeviceMapping;
use iomt_connector::template::fhir::FhirMapping;
use iomt_connector::transform::{CreateIdentity, LookupIdentities, OfflineIdentity, transform};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The exit statuses every command shares; each command's --help says which it uses.
const EXIT_STATUS: &str = "\
Exit status:
  0  done
  1  something did not go through: a message or group that does not convert, problems
     `validate` found, a broker or FHIR server that failed, a health check that failed
  2  usage: an unknown flag or value, a file that cannot be read, settings that do not validate
  3  invalid mapping: a device or FHIR mapping file that does not load (run `validate` on it)";

#[derive(Parser)]
#[command(
    name = "iomt-connector",
    version,
    about = "Device messages to FHIR R4 Observations, with Azure MedTech mapping files",
    after_help = EXIT_STATUS
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
    /// Print the Observations a batch of messages becomes on an empty FHIR server.
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
    /// Print the effective settings (defaults, --config FILE, IOMT_* variables), secrets hidden.
    #[command(after_help = CONFIG_HELP)]
    Config(ConfigArgs),
    /// Probe a running connector's /health/live (or another endpoint): for container health checks.
    #[command(after_help = HEALTH_HELP)]
    Health(HealthArgs),
    /// Print a shell completion script.
    #[command(after_help = COMPLETIONS_HELP)]
    Completions(CompletionsArgs),
}

const CONFIG_HELP: &str = "\
Prints the settings `run` would use, as TOML (or JSON with --json): config/default.toml's values,
then --config FILE, then IOMT_<SECTION>__<KEY> variables. Passwords, tokens, client secrets,
access keys and the user information of URLs are printed as ***. The output is a valid settings
file once the secrets are filled in again.

Exit status: 0 when the settings validate; 2 when they do not (they are still printed, and every
problem is listed on stderr with its key) or a value cannot be read at all.

Example:
  IOMT_FHIR__BASE_URL=https://fhir.example/r4 iomt-connector config --config prod.toml";

#[derive(Args)]
struct ConfigArgs {
    /// Settings file (TOML), as for `run`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print JSON instead of TOML.
    #[arg(long)]
    json: bool,
}

const HEALTH_HELP: &str = "\
GETs --url (default: /health/live on the settings' http.listen, with 0.0.0.0 read as 127.0.0.1
and :: as ::1) and prints the answer. Made for the container image's HEALTHCHECK, which has no
curl: liveness only, since /health/ready also depends on the broker and the FHIR server.

Exit status: 0 on a 2xx answer; 1 on any other answer, no answer within --timeout-secs, or a
refused connection; 2 for a --url that is not an http URL or settings that cannot be read.

Example:
  iomt-connector health --url http://127.0.0.1:8080/health/ready";

#[derive(Args)]
struct HealthArgs {
    /// The endpoint to GET (default: http://<http.listen>/health/live).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Settings file (TOML) whose http.listen gives the default --url.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3.0)]
    timeout_secs: f64,
}

const COMPLETIONS_HELP: &str = "\
Writes the completion script for SHELL to stdout.

Examples:
  iomt-connector completions bash > /etc/bash_completion.d/iomt-connector
  iomt-connector completions zsh > \"${fpath[1]}/_iomt-connector\"
  iomt-connector completions fish > ~/.config/fish/completions/iomt-connector.fish";

#[derive(Args)]
struct CompletionsArgs {
    #[arg(value_enum)]
    shell: clap_complete::Shell,
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
recorded as redriven (events cannot be removed from a hub).

Exit status: 0 when every message that passes was moved; 1 when one could not be, or the source
failed; 2 for settings that do not validate; 3 when the current mappings do not load.

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
            .map_err(|e| Failure::Usage(format!("error: {e}")))
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

Exit status: 0 after a stop with every message settled; 1 when messages were left unacked at the
stop, or the service failed (the HTTP address taken, ...); 2 for settings that do not validate;
3 for mapping files that do not load.

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
MESSAGE_FILE - reads the message from stdin.

Exit status: 0 with the array (possibly []); 1 when the message cannot be normalized (not JSON, a
required value missing, an expression failing: one line on stderr names the template's typeName,
the expression and the reason); 2 when a file cannot be read; 3 when the mapping does not load.

Example:
  iomt-connector normalize --device-mapping mappings/devicecontent.json mappings/messages/heartrate.json";

const TRANSFORM_HELP: &str = "\
Normalizes every MESSAGE_FILE in order as one batch (- reads one message from stdin), groups the
measurements per device, type, patient, encounter, correlation id and window, and prints the JSON
array of FHIR R4 Observations the service would write to an empty FHIR server. Readings with equal
timestamps: the later file wins. `issued` is the current time.

Identity (--identity-mode, as identity.mode):
  Create               Patient and Device ids derived from the message's patientId and deviceId
                       (sha256 of \"{system}_{value}\"); a template without patientIdExpression fails
  Lookup               the Device and its Patient from --identities, a JSON file standing in for the
                       FHIR server's Devices, keyed by the deviceId the mapping projects:
                         {\"devices\": {\"device123\": {\"device\": \"Device/d1\", \"patient\": \"Patient/p1\",
                                                   \"patientIdentifiers\": [\"mrn-1\"]}},
                          \"encounters\": {\"visit-7\": \"Encounter/e7\"}}
                       (a message's patientId must be the Patient's id or one of patientIdentifiers)
  LookupWithEncounter  as Lookup, and the encounterId from \"encounters\"

Exit status: 0 when every message and group converts; 1 when any fails: the Observations that did
convert are printed all the same, and each failure is one line on stderr; 2 for a file that cannot
be read or an --identities file that is not as above; 3 when a mapping does not load.

Examples:
  iomt-connector transform --device-mapping mappings/devicecontent.json \\
      --fhir-mapping mappings/fhirmapping.json mappings/messages/heartrate.json mappings/messages/spo2.json
  iomt-connector transform --device-mapping D.json --fhir-mapping F.json \\
      --identity-mode Lookup --identities identities.json msg.json";

const VALIDATE_HELP: &str = "\
Lists every problem as FILE:LINE:COLUMN: message on stderr, including cross-checks between the two
mappings (a device typeName without a FHIR template; a device value name no FHIR template uses),
and prints a summary when there is none. With --json, stdout is one object instead:
  {\"valid\", \"loads\", \"deviceMapping\": {\"file\", \"templates\"}, \"fhirMapping\": {..} or null,
   \"problems\": [{\"file\", \"line\", \"column\", \"template\", \"message\", \"crossCheck\"}], \"notes\": [..]}

Exit status: 0 when valid; 1 when the mappings load but the cross-checks find problems (`run`
takes such a pair, and dead-letters the messages they concern); 2 when a file cannot be read;
3 when a mapping does not load (`run` would refuse it).

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
    /// The device message (its body, or the envelope with --envelope); - for stdin.
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
    /// Identifier system of Device resources (MedTech's DefaultDeviceIdentifierSystem; Create).
    #[arg(long, value_name = "URI")]
    device_identifier_system: Option<String>,
    /// How Patient, Device (and Encounter) ids are found, as identity.mode.
    #[arg(long, value_enum, default_value = "Create", ignore_case = true)]
    identity_mode: IdentityMode,
    /// The Devices (and Encounters) Lookup modes find, as JSON (see below).
    #[arg(long, value_name = "FILE")]
    identities: Option<PathBuf>,
    /// Device messages, in ingestion order; - reads one from stdin.
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
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// What ends a command, by its exit status (EXIT_STATUS); the text goes to stderr and names what
/// to fix.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    InvalidMapping(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Failed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::InvalidMapping(_) => 3,
        }
    }
}

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
        Command::Config(a) => config(a),
        Command::Health(a) => health(a),
        Command::Completions(a) => {
            clap_complete::generate(a.shell, &mut Cli::command(), "iomt-connector", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{failure}");
            ExitCode::from(failure.code())
        }
    }
}

fn read(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("error: cannot read {}: {e}", path.display())))
}

fn mapping_errors(path: &Path, errors: &[TemplateError]) -> String {
    iomt_connector::template::located_all(errors, &path.display().to_string())
}

/// Loads a mapping pair (or a device mapping alone) through the engine, refusing it with every
/// problem located. Cross-check findings do not refuse a pair.
fn load(device: &Path, fhir: Option<&Path>) -> Result<(DeviceMapping, Option<FhirMapping>), Failure> {
    let fhir_text = fhir.map(read).transpose()?;
    let fhir_file = fhir.map(|p| p.display().to_string()).unwrap_or_default();
    let Checked { device: d, fhir: f, report } = engine::check(&read(device)?, fhir_text.as_deref(), &fhir_file);
    if !report.device.is_empty() {
        return Err(Failure::InvalidMapping(mapping_errors(device, &report.device)));
    }
    if let Some(path) = fhir.filter(|_| !report.fhir.is_empty()) {
        return Err(Failure::InvalidMapping(mapping_errors(path, &report.fhir)));
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

fn is_stdin(path: &Path) -> bool {
    path == Path::new("-")
}

/// How a message argument is named in errors.
fn shown(path: &Path) -> String {
    if is_stdin(path) { "(stdin)".to_string() } else { path.display().to_string() }
}

/// A message argument's bytes: the file's, or stdin's for `-`.
fn read_message(path: &Path) -> Result<Vec<u8>, Failure> {
    let mut bytes = Vec::new();
    let read = if is_stdin(path) {
        std::io::stdin().read_to_end(&mut bytes).map(|_| ())
    } else {
        std::fs::read(path).map(|b| bytes = b)
    };
    read.map_err(|e| Failure::Usage(format!("error: cannot read {}: {e}", shown(path))))?;
    Ok(bytes)
}

fn normalize_bytes(
    mapping: &DeviceMapping,
    path: &Path,
    bytes: &[u8],
    envelope: bool,
) -> Result<Vec<Measurement>, Failure> {
    let result = if envelope { mapping.normalize_event_bytes(bytes) } else { mapping.normalize_body(bytes) };
    result.map_err(|e| Failure::Failed(format!("error: {}: {e}", shown(path))))
}

fn print_json(v: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Failure::Usage(format!("error: {e}")))?;
    println!("{text}");
    Ok(())
}

fn normalize(a: NormalizeArgs) -> Result<(), Failure> {
    let mapping = load_device(&a.device_mapping)?;
    let bytes = read_message(&a.message)?;
    let measurements = normalize_bytes(&mapping, &a.message, &bytes, a.envelope)?;
    print_json(&measurements)
}

/// The identity `transform` resolves with: Create from the message, Lookup modes from the file.
fn offline_identity(a: &TransformArgs) -> Result<Box<dyn OfflineIdentity>, Failure> {
    match (a.identity_mode, &a.identities) {
        (IdentityMode::Create, None) => {
            Ok(Box::new(CreateIdentity { device_system: a.device_identifier_system.clone() }))
        }
        (IdentityMode::Create, Some(_)) => Err(Failure::Usage(
            "error: --identities is read only with --identity-mode Lookup or LookupWithEncounter (Create derives the ids from the message)".into(),
        )),
        (mode, None) => Err(Failure::Usage(format!(
            "error: --identity-mode {mode:?} needs --identities FILE: the Devices (and Encounters) to find, as JSON (see transform --help)"
        ))),
        (mode, Some(path)) => {
            let lookup = LookupIdentities::parse(mode, &path.display().to_string(), &read(path)?)
                .map_err(|e| Failure::Usage(format!("error: {e}")))?;
            Ok(Box::new(lookup))
        }
    }
}

/// Converts what it can: every message and group that fails is one line of the failure, and the
/// Observations of the others are printed all the same.
fn transform_cmd(a: TransformArgs) -> Result<(), Failure> {
    if a.messages.iter().filter(|p| is_stdin(p)).count() > 1 {
        return Err(Failure::Usage("error: - (stdin) can be given once among the MESSAGE_FILEs".into()));
    }
    let identity = offline_identity(&a)?;
    let (device, fhir) = load_pair(&a.device_mapping, &a.fhir_mapping)?;
    let inputs: Vec<Vec<u8>> = a.messages.iter().map(|p| read_message(p)).collect::<Result<_, _>>()?;
    let (mut measurements, mut failures) = (Vec::new(), Vec::new());
    for (path, bytes) in a.messages.iter().zip(&inputs) {
        match normalize_bytes(&device, path, bytes, a.envelope) {
            Ok(ms) => measurements.extend(ms),
            Err(f) => failures.push(f.to_string()),
        }
    }
    let batch = transform(&fhir, measurements, &*identity, chrono::Utc::now());
    print_json(&batch.observations)?;
    failures.extend(batch.errors.iter().map(|e| format!("error: {e}")));
    if failures.is_empty() { Ok(()) } else { Err(Failure::Failed(failures.join("\n"))) }
}

fn run(a: RunArgs) -> Result<(), Failure> {
    use iomt_connector::pipeline::mappings::LoadError;
    use iomt_connector::service::RunError;
    let settings = Settings::load(a.config.as_deref()).map_err(|e| Failure::Usage(format!("error: {e}")))?;
    init_logging(&settings.log);
    iomt_connector::service::run(settings, a.dry_run).map_err(|e| match e {
        RunError::Mappings(LoadError::Mapping { .. }) => Failure::InvalidMapping(format!("error: {e}")),
        e => Failure::Failed(format!("error: {e}")),
    })
}

fn config(a: ConfigArgs) -> Result<(), Failure> {
    let settings = Settings::load_unchecked(a.config.as_deref()).map_err(|e| Failure::Usage(format!("error: {e}")))?;
    let shown = settings.redacted();
    let text = if a.json {
        serde_json::to_string_pretty(&shown).map_err(|e| Failure::Failed(format!("error: {e}")))?
    } else {
        toml::to_string(&shown).map_err(|e| Failure::Failed(format!("error: {e}")))?
    };
    if !a.json {
        println!("# The effective settings: defaults, then --config, then IOMT_* variables. Secrets: ***");
    }
    println!("{}", text.trim_end());
    settings.check().map_err(|e| Failure::Usage(format!("error: {e}")))
}

/// The endpoint `health` probes without --url: liveness on the settings' listen address, reached
/// over loopback when it listens on every address.
fn health_url(a: &HealthArgs) -> Result<String, Failure> {
    if let Some(url) = &a.url {
        return Ok(url.clone());
    }
    let http = Settings::load_http(a.config.as_deref()).map_err(|e| Failure::Usage(format!("error: {e}")))?;
    let addr: std::net::SocketAddr = http.listen.parse().map_err(|_| {
        Failure::Usage(format!(
            "error: http.listen '{}' is not an address like 127.0.0.1:8080; or pass --url",
            http.listen
        ))
    })?;
    let host = match addr.ip() {
        ip if !ip.is_unspecified() => ip,
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    Ok(format!("http://{}/health/live", std::net::SocketAddr::new(host, addr.port())))
}

fn health(a: HealthArgs) -> Result<(), Failure> {
    let url = health_url(&a)?;
    let parsed = reqwest::Url::parse(&url).ok().filter(|u| u.scheme() == "http" || u.scheme() == "https");
    let Some(parsed) = parsed else {
        return Err(Failure::Usage(format!("error: --url '{url}' is not an http(s) URL")));
    };
    let timeout = std::time::Duration::try_from_secs_f64(a.timeout_secs)
        .map_err(|_| Failure::Usage(format!("error: --timeout-secs {} is not a duration", a.timeout_secs)))?;
    let shown = iomt_connector::problems::redact(&url);
    let answer = runtime()?.block_on(async {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        let response = client.get(parsed).send().await?;
        let status = response.status();
        Ok::<_, reqwest::Error>((status, response.text().await.unwrap_or_default()))
    });
    match answer {
        Ok((status, body)) if status.is_success() => {
            println!("{} {}", status.as_u16(), body.trim());
            Ok(())
        }
        Ok((status, body)) => Err(Failure::Failed(format!("error: GET {shown} answered {status}: {}", body.trim()))),
        Err(e) => Err(Failure::Failed(format!(
            "error: GET {shown}: no answer ({}); is the connector running and listening there (http.listen)?",
            iomt_connector::problems::redact(&e.to_string())
        ))),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Usage(format!("error: {e}")))
}

fn studio(a: StudioArgs) -> Result<(), Failure> {
    let loopback = match a.listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => a.listen.starts_with("localhost:"),
    };
    if !loopback && a.token.is_empty() {
        return Err(Failure::Usage(format!(
            "error: refusing to serve the mapping debugger on {} without --token (or IOMT_STUDIO_TOKEN): anyone who can reach it could read the mappings and samples; set a token, or listen on 127.0.0.1",
            a.listen
        )));
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
        .map_err(|e| Failure::Failed(format!("error: cannot serve on {} (--listen): {e}", a.listen)))
}

fn dead_letters_list(a: DeadLettersListArgs) -> Result<(), Failure> {
    let source = iomt_connector::source::registry::dead_letters_of(a.config.as_deref())
        .map_err(|e| Failure::Usage(format!("error: {e}")))?;
    let rt = runtime()?;
    let letters = rt.block_on(source.dead_letters()).map_err(|e| Failure::Failed(format!("error: {e}")))?;
    let (name, what) = (letters.name(), letters.what());
    let kinds = rt.block_on(deadletters::list(letters)).map_err(|e| Failure::Failed(format!("error: {e}")))?;
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
    let settings = Settings::load(a.config.as_deref()).map_err(|e| Failure::Usage(format!("error: {e}")))?;
    let (device, fhir) = load_pair(&settings.mappings.device, &settings.mappings.fhir)?;
    let source = iomt_connector::source::registry::configured(&settings);
    let rt = runtime()?;
    let letters = rt.block_on(source.dead_letters()).map_err(|e| Failure::Failed(format!("error: {e}")))?;
    let (name, what, back_to) = (letters.name(), letters.what(), letters.back_to());
    let r = rt
        .block_on(deadletters::redrive(letters, &device, &fhir, a.kind.as_deref(), a.dry_run))
        .map_err(|e| Failure::Failed(format!("error: {e}")))?;
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
        Err(Failure::Failed(format!("error: {} message(s) not moved: {}", r.not_moved.len(), r.not_moved[0])))
    }
}

fn publish(a: PublishArgs) -> Result<(), Failure> {
    let source = a.broker.target()?;
    let mut bodies = Vec::new();
    for p in &a.messages {
        bodies.push(std::fs::read(p).map_err(|e| Failure::Usage(format!("error: cannot read {}: {e}", p.display())))?);
    }
    runtime()?.block_on(async {
        let fail = |e: String| Failure::Failed(format!("error: {e}"));
        let mut p = source.publisher(256).await.map_err(fail)?;
        for body in &bodies {
            p.send(body, a.routing_key.as_deref()).await.map_err(fail)?;
        }
        p.flush().await.map_err(fail)?;
        let ((confirmed, refused), to) = (p.counts(), p.target());
        println!("published {} message(s) to {to}: {confirmed} confirmed, {refused} refused", bodies.len());
        if refused > 0 { Err(Failure::Failed("error: some messages were refused".into())) } else { Ok(()) }
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
    let s = runtime()?.block_on(run(&plan)).map_err(|e| Failure::Failed(format!("error: {e}")))?;
    println!(
        "sent {}, confirmed {}, refused {}, elapsed {:.2} s, rate {:.0} msg/s",
        s.sent,
        s.confirmed,
        s.refused,
        s.elapsed.as_secs_f64(),
        s.rate()
    );
    if s.refused > 0 { Err(Failure::Failed("error: the broker refused some messages".into())) } else { Ok(()) }
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

/// Exit status 3 when the pair would be refused, 1 when only the cross-checks found problems.
fn validate_failure(report: &engine::Report, text: String) -> Failure {
    if report.refuses() { Failure::InvalidMapping(text) } else { Failure::Failed(text) }
}

fn problem_json(file: &str, e: &TemplateError, cross: bool) -> serde_json::Value {
    serde_json::json!({"file": file, "line": e.line, "column": e.column, "template": e.template,
        "message": e.message, "crossCheck": cross})
}

fn validate_json(a: &ValidateArgs, checked: &Checked) -> Result<(), Failure> {
    let Checked { device, fhir, report } = checked;
    let device_file = a.device_mapping.display().to_string();
    let fhir_file = a.fhir_mapping.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let mut problems: Vec<_> = report.device.iter().map(|e| problem_json(&device_file, e, false)).collect();
    problems.extend(report.fhir.iter().map(|e| problem_json(&fhir_file, e, false)));
    problems.extend(report.cross.iter().map(|e| problem_json(&device_file, e, true)));
    let count = report.problem_count();
    print_json(&serde_json::json!({
        "valid": count == 0,
        "loads": !report.refuses(),
        "deviceMapping": {"file": device_file, "templates": device.templates.len()},
        "fhirMapping": fhir.as_ref().map(|f| serde_json::json!({"file": fhir_file, "templates": f.templates.len()})),
        "problems": problems,
        "notes": report.notes.iter().map(|e| problem_json(&fhir_file, e, false)).collect::<Vec<_>>(),
    }))?;
    if count == 0 { Ok(()) } else { Err(validate_failure(report, format!("{count} problem(s) found"))) }
}

fn validate(a: ValidateArgs) -> Result<(), Failure> {
    let fhir_text = a.fhir_mapping.as_deref().map(read).transpose()?;
    let fhir_file = a.fhir_mapping.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let checked = engine::check(&read(&a.device_mapping)?, fhir_text.as_deref(), &fhir_file);
    if a.json {
        return validate_json(&a, &checked);
    }
    let Checked { device, fhir, report } = checked;
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
        return Err(validate_failure(&report, format!("{}\n{count} problem(s) found", problems.join("\n"))));
    }
    println!("{}\nvalid", summary.join("\n"));
    Ok(())
}
