//! The registry of sources: the configured one built from its settings section, and the ones the
//! command line sends to or reads dead letters from. A new source adds its line to each match.

use super::{Source, SourceKind, eventhubs::EventHubsSource, rabbitmq::Rabbitmq};
use crate::config::{ConfigError, Settings};
use std::path::Path;

/// The configured source (`source.kind`), built from its settings section.
pub fn configured(settings: &Settings) -> Box<dyn Source> {
    match settings.source.kind {
        SourceKind::Rabbitmq => Box::new(Rabbitmq(settings.broker.clone())),
        SourceKind::Eventhubs => Box::new(EventHubsSource(settings.eventhubs.clone())),
    }
}

/// Where `publish` and `simulate` send: the event hub `hub` with the `[eventhubs]` credentials, or
/// the `[broker]` queue (`url`, `queue` replacing the settings'), from the settings `file`.
pub fn sending_to(
    file: Option<&Path>,
    hub: Option<String>,
    url: Option<String>,
    queue: Option<String>,
) -> Result<Box<dyn Source>, ConfigError> {
    if let Some(hub) = hub {
        let mut e = Settings::load_eventhubs(file)?;
        e.hub = hub;
        return Ok(Box::new(EventHubsSource(e)));
    }
    let mut b = Settings::load_broker(file)?;
    b.url = url.unwrap_or(b.url);
    b.queue = queue.unwrap_or(b.queue);
    Ok(Box::new(Rabbitmq(b)))
}

/// The configured source, read with the settings `file` for its dead letters (only its own section
/// is needed: no mapping files).
pub fn dead_letters_of(file: Option<&Path>) -> Result<Box<dyn Source>, ConfigError> {
    Ok(match Settings::load_source_kind(file)? {
        SourceKind::Rabbitmq => Box::new(Rabbitmq(Settings::load_broker(file)?)),
        SourceKind::Eventhubs => Box::new(EventHubsSource(Settings::load_eventhubs(file)?)),
    })
}
