//! The mapping language: device mappings (MedTech `CollectionContent`) and FHIR mappings
//! (`CollectionFhir`). Pure and I/O-free: callers hand in the mapping text.
//!
//! Mappings are read from a position-keeping JSON AST so every problem is reported with the line
//! and column of the member at fault, and all problems of a file are reported together.

pub mod crosscheck;
pub mod device;
pub mod expression;
pub mod fhir;
pub mod jmespath;
pub mod jsonpath;

use jsonc_parser::ast::{Object, ObjectProp, Value as Node};
use jsonc_parser::common::Ranged;
use std::fmt;

/// One problem in a mapping file.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateError {
    pub line: usize,
    pub column: usize,
    /// The template the problem is in, e.g. `CalculatedContent 'heartrate'`, when known.
    pub template: Option<String>,
    pub message: String,
}

impl TemplateError {
    /// `FILE:LINE:COLUMN: template: message`, the form editors and terminals link to.
    pub fn located(&self, file: &str) -> String {
        format!("{file}:{}:{}: {}", self.line, self.column, self.what())
    }

    fn what(&self) -> String {
        match &self.template {
            Some(t) => format!("{t}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.what())
    }
}

/// Every problem found in a mapping file (never empty).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct TemplateErrors(pub Vec<TemplateError>);

/// Every error as `FILE:LINE:COLUMN: message`, one a line.
pub fn located_all(errors: &[TemplateError], file: &str) -> String {
    errors.iter().map(|e| e.located(file)).collect::<Vec<_>>().join("\n")
}

impl fmt::Display for TemplateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads a mapping's AST, collecting errors with positions instead of stopping at the first.
pub(crate) struct Reader<'t> {
    text: &'t str,
    line_starts: Vec<usize>,
    pub errors: Vec<TemplateError>,
    /// The template being read, named in its errors.
    pub context: Option<String>,
}

pub(crate) type Pos = (usize, usize);

impl<'t> Reader<'t> {
    pub fn new(text: &'t str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Reader { text, line_starts, errors: Vec::new(), context: None }
    }

    /// Parses strict JSON (no comments, trailing commas or other JSON5 leniency).
    pub fn parse(&mut self) -> Option<Node<'t>> {
        let opts = jsonc_parser::ParseOptions {
            allow_comments: false,
            allow_loose_object_property_names: false,
            allow_trailing_commas: false,
            allow_missing_commas: false,
            allow_single_quoted_strings: false,
            allow_hexadecimal_numbers: false,
            allow_unary_plus_numbers: false,
            allow_bare_decimal_point_numbers: false,
            allow_non_finite_numbers: false,
            allow_extended_string_escapes: false,
        };
        match jsonc_parser::parse_to_ast(self.text, &Default::default(), &opts) {
            Ok(r) => match r.value {
                Some(v) => Some(v),
                None => {
                    self.error_at(0, "the mapping file is empty".into());
                    None
                }
            },
            Err(e) => {
                self.errors.push(TemplateError {
                    line: e.line_display(),
                    column: e.column_display(),
                    template: None,
                    message: format!("not valid JSON: {}", e.kind()),
                });
                None
            }
        }
    }

    pub fn pos(&self, byte: usize) -> Pos {
        let line = self.line_starts.partition_point(|&s| s <= byte);
        let start = self.line_starts[line - 1];
        let column = self.text.get(start..byte).map_or(byte - start, |s| s.chars().count()) + 1;
        (line, column)
    }

    pub fn error_at(&mut self, byte: usize, message: String) {
        let (line, column) = self.pos(byte);
        self.errors.push(TemplateError { line, column, template: self.context.clone(), message });
    }

    pub fn error(&mut self, node: &impl Ranged, message: String) {
        self.error_at(node.start(), message)
    }
}

pub(crate) fn kind_name(node: &Node<'_>) -> &'static str {
    match node {
        Node::StringLit(_) => "a string",
        Node::NumberLit(_) => "a number",
        Node::BooleanLit(_) => "a boolean",
        Node::Object(_) => "an object",
        Node::Array(_) => "an array",
        Node::NullKeyword(_) => "null",
    }
}

/// The members of one JSON object, looked up case-insensitively as Newtonsoft.Json does.
pub(crate) struct Members<'a, 't> {
    obj: &'a Object<'t>,
    props: Vec<(String, &'a ObjectProp<'t>)>,
}

impl<'a, 't> Members<'a, 't> {
    /// Reads `obj`, reporting members not in `allowed` (unknown members are errors, as in the
    /// reference) and members given twice.
    pub fn read(r: &mut Reader<'_>, obj: &'a Object<'t>, allowed: &[&str], what: &str) -> Self {
        let mut props: Vec<(String, &'a ObjectProp<'t>)> = Vec::new();
        for p in &obj.properties {
            let name = p.name.as_str();
            let Some(canonical) = allowed.iter().find(|a| a.eq_ignore_ascii_case(name)) else {
                r.error(p, format!("unknown member '{name}' in {what}; expected one of: {}", allowed.join(", ")));
                continue;
            };
            if props.iter().any(|(n, _)| n == canonical) {
                r.error(p, format!("member '{name}' is given twice in {what}"));
                continue;
            }
            props.push((canonical.to_string(), p));
        }
        Members { obj, props }
    }

    pub fn get(&self, name: &str) -> Option<&'a Node<'t>> {
        self.props.iter().find(|(n, _)| n == name).map(|(_, p)| &p.value)
    }

    pub fn prop(&self, name: &str) -> Option<&'a ObjectProp<'t>> {
        self.props.iter().find(|(n, _)| n == name).map(|(_, p)| *p)
    }

    /// A required member: reports it missing at the object's position.
    pub fn required(&self, r: &mut Reader<'_>, name: &str) -> Option<&'a Node<'t>> {
        let v = self.get(name);
        if v.is_none() {
            r.error(self.obj, format!("required member '{name}' is missing"));
        }
        v
    }

    pub fn string(&self, r: &mut Reader<'_>, name: &str, required: bool) -> Option<String> {
        let node = if required { self.required(r, name)? } else { self.get(name)? };
        match node {
            Node::StringLit(s) => Some(s.value.to_string()),
            Node::NullKeyword(_) if !required => None,
            other => {
                r.error(other, format!("'{name}' must be a string, not {}", kind_name(other)));
                None
            }
        }
    }

    /// A boolean that may also be written as the string "true"/"false" (Newtonsoft accepts both).
    pub fn boolean(&self, r: &mut Reader<'_>, name: &str) -> Option<bool> {
        match self.get(name)? {
            Node::BooleanLit(b) => Some(b.value),
            Node::StringLit(s) if s.value.eq_ignore_ascii_case("true") => Some(true),
            Node::StringLit(s) if s.value.eq_ignore_ascii_case("false") => Some(false),
            other => {
                r.error(other, format!("'{name}' must be true or false"));
                None
            }
        }
    }

    pub fn integer(&self, r: &mut Reader<'_>, name: &str) -> Option<i64> {
        match self.get(name)? {
            Node::NumberLit(n) => match n.value.parse::<i64>() {
                Ok(i) => Some(i),
                Err(_) => {
                    r.error(n, format!("'{name}' must be a whole number, not {}", n.value));
                    None
                }
            },
            Node::StringLit(s) if s.value.trim().parse::<i64>().is_ok() => s.value.trim().parse().ok(),
            other => {
                r.error(other, format!("'{name}' must be a whole number, not {}", kind_name(other)));
                None
            }
        }
    }

    pub fn array(&self, r: &mut Reader<'_>, name: &str, required: bool) -> Option<&'a [Node<'t>]> {
        let node = if required { self.required(r, name)? } else { self.get(name)? };
        match node {
            Node::Array(a) => Some(&a.elements),
            other => {
                r.error(other, format!("'{name}' must be an array, not {}", kind_name(other)));
                None
            }
        }
    }
}

/// `{"templateType": ..., "template": ...}`, the wrapper every template sits in.
pub(crate) struct Wrapped<'a, 't> {
    pub template_type: String,
    pub template: &'a Node<'t>,
    pub at: &'a Object<'t>,
    /// The `templateType` value: where a wrong type is reported, rather than at the enclosing
    /// object, so an editor marks the member to change.
    pub type_at: Option<&'a Node<'t>>,
}

impl Wrapped<'_, '_> {
    /// Reports an unknown `templateType` at its value, naming the template by its `typeName` when
    /// it has one: the type's error stops the template being read, so without this nothing would
    /// say which of several templates it is.
    pub fn unknown_type(&self, r: &mut Reader<'_>, message: String) {
        let name = match self.template {
            Node::Object(o) => o.properties.iter().find(|p| p.name.as_str().eq_ignore_ascii_case("typeName")),
            _ => None,
        };
        let context = r.context.take();
        if let Some(Node::StringLit(s)) = name.map(|p| &p.value) {
            r.context = Some(format!("template '{}'", s.value));
        }
        match self.type_at {
            Some(node) => r.error(node, message),
            None => r.error(self.at, message),
        }
        r.context = context;
    }
}

pub(crate) fn wrapped<'a, 't>(r: &mut Reader<'_>, node: &'a Node<'t>, what: &str) -> Option<Wrapped<'a, 't>> {
    let Node::Object(obj) = node else {
        r.error(node, format!("{what} must be an object with 'templateType' and 'template', not {}", kind_name(node)));
        return None;
    };
    let m = Members::read(r, obj, &["templateType", "template"], what);
    let template_type = m.string(r, "templateType", true);
    let template = m.required(r, "template");
    Some(Wrapped { template_type: template_type?, template: template?, at: obj, type_at: m.get("templateType") })
}
