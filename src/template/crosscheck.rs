//! Whether a device mapping and a FHIR mapping fit together: every device type needs a FHIR
//! template, and a device value no FHIR template uses would be dropped. Shared by `validate`, the
//! service's start and its mapping reload.

use super::TemplateError;
use super::device::DeviceMapping;
use super::fhir::{FhirMapping, PeriodInterval, ValueKind};

/// What the cross-checks found.
#[derive(Debug, Default)]
pub struct CrossCheck {
    /// Problems, at their place in the device mapping.
    pub problems: Vec<TemplateError>,
    /// Worth knowing but not wrong, at their place in the FHIR mapping.
    pub notes: Vec<TemplateError>,
}

/// Checks `device` against `fhir`; `fhir_file` names the FHIR mapping in the messages.
pub fn cross_check(device: &DeviceMapping, fhir: &FhirMapping, fhir_file: &str) -> CrossCheck {
    let mut out = CrossCheck::default();
    for t in &device.templates {
        let at = |line, column, message: String| TemplateError { line, column, template: None, message };
        let Some(ft) = fhir.template(&t.type_name) else {
            out.problems.push(at(
                t.line,
                t.column,
                format!(
                    "{} '{}': no FHIR template has this typeName; add a CodeValueFhir with typeName '{}' to {fhir_file}",
                    t.kind.name(),
                    t.type_name,
                    t.type_name
                ),
            ));
            continue;
        };
        for v in &t.values {
            if !ft.value_templates().any(|fv| *fv.value_name == *v.name) {
                out.problems.push(at(
                    v.line,
                    v.column,
                    format!(
                        "{} '{}': value '{}' is not used by FHIR template '{}' ({fhir_file}:{}); it would be dropped",
                        t.kind.name(),
                        t.type_name,
                        v.name,
                        ft.type_name,
                        ft.line
                    ),
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
            out.notes.push(TemplateError {
                line: ft.line,
                column: ft.column,
                template: None,
                message: format!(
                    "CodeValueFhir '{}' has {} values, which hold one reading: each reading becomes its own instant Observation (periodInterval {:?} is not used)",
                    ft.type_name,
                    kinds.join("/"),
                    ft.period_interval
                ),
            });
        }
    }
    out
}
