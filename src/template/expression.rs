//! A template expression: JSONPath (MedTech dialect) or JMESPath, compiled once when the mapping
//! loads, evaluated per message.

use super::jmespath as jmes;
use super::jsonpath::{JsonPath, Scope};
use super::{Members, Reader, kind_name};
use jmespath::{Rcvar, Variable};
use jsonc_parser::ast::Value as Node;
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    JsonPath,
    JmesPath,
}

impl Language {
    pub fn name(self) -> &'static str {
        match self {
            Language::JsonPath => "JsonPath",
            Language::JmesPath => "JmesPath",
        }
    }

    pub fn parse(s: &str) -> Option<Language> {
        if s.eq_ignore_ascii_case("JsonPath") {
            Some(Language::JsonPath)
        } else if s.eq_ignore_ascii_case("JmesPath") {
            Some(Language::JmesPath)
        } else {
            None
        }
    }
}

pub struct Expression {
    pub text: String,
    compiled: Compiled,
}

enum Compiled {
    JsonPath(JsonPath),
    JmesPath(Box<jmes::Expression>),
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.language().name(), self.text)
    }
}

/// What one message (and, in CalculatedContent, one match) is evaluated against.
pub struct Input<'a> {
    pub scope: Scope<'a>,
    /// The same document as a JMESPath variable, built only when a JMESPath expression runs.
    pub jmes: &'a dyn Fn() -> Result<Rcvar, String>,
}

impl Expression {
    pub fn compile(text: &str, language: Language) -> Result<Expression, String> {
        let compiled = match language {
            Language::JsonPath => Compiled::JsonPath(JsonPath::parse(text).map_err(|e| e.to_string())?),
            Language::JmesPath => Compiled::JmesPath(Box::new(jmes::compile(text)?)),
        };
        Ok(Expression { text: text.to_string(), compiled })
    }

    pub fn language(&self) -> Language {
        match self.compiled {
            Compiled::JsonPath(_) => Language::JsonPath,
            Compiled::JmesPath(_) => Language::JmesPath,
        }
    }

    /// Every token selected (a JMESPath array result is one token per element, as the reference's
    /// `SelectTokens` does; null selects nothing).
    pub fn select_all<'a>(&self, input: &Input<'a>) -> Result<Vec<Token<'a>>, String> {
        match &self.compiled {
            Compiled::JsonPath(p) => Ok(p.select(input.scope).into_iter().map(Token::Json).collect()),
            Compiled::JmesPath(e) => {
                let r = jmes::search(e, &(input.jmes)()?).map_err(|e| jmes::describe(&e))?;
                Ok(match &*r {
                    Variable::Null => vec![],
                    Variable::Array(items) => items.iter().cloned().map(Token::Jmes).collect(),
                    _ => vec![Token::Jmes(r)],
                })
            }
        }
    }

    /// The single token selected, if any. More than one is an error: a device id, a timestamp or a
    /// value must be one thing.
    pub fn select_one<'a>(&self, input: &Input<'a>) -> Result<Option<Token<'a>>, String> {
        let too_many = |n: usize| format!("returned {n} tokens where one was expected");
        match &self.compiled {
            Compiled::JsonPath(p) => p.select_one(input.scope).map(|v| v.map(Token::Json)).map_err(too_many),
            Compiled::JmesPath(_) => {
                let mut all = self.select_all(input)?;
                if all.len() > 1 {
                    return Err(too_many(all.len()));
                }
                Ok(all.pop())
            }
        }
    }
}

/// A selected token: borrowed from the message (JSONPath) or computed (JMESPath).
#[derive(Debug, Clone)]
pub enum Token<'a> {
    Json(&'a Value),
    Jmes(Rcvar),
}

impl Token<'_> {
    pub fn is_null(&self) -> bool {
        match self {
            Token::Json(v) => v.is_null(),
            Token::Jmes(v) => v.is_null(),
        }
    }

    /// Text as the reference stores values: strings as they are, other values as their JSON
    /// text (`true`, `1.5`); `None` for null.
    pub fn text(&self) -> Option<String> {
        match self {
            Token::Json(Value::Null) => None,
            Token::Json(Value::String(s)) => Some(s.clone()),
            Token::Json(v) => Some(v.to_string()),
            Token::Jmes(v) => match &**v {
                Variable::Null => None,
                Variable::String(s) => Some(s.clone()),
                Variable::Bool(b) => Some(b.to_string()),
                Variable::Number(n) => Some(n.to_string()),
                other => Some(to_json(other).to_string()),
            },
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Token::Json(v) => v.as_str(),
            Token::Jmes(v) => v.as_string().map(String::as_str),
        }
    }

    pub fn is_number(&self) -> bool {
        match self {
            Token::Json(v) => v.is_number(),
            Token::Jmes(v) => v.is_number(),
        }
    }

    /// "a number", "an object", ...: for messages about a token of the wrong kind.
    pub fn kind_name(&self) -> &'static str {
        let v = match self {
            Token::Json(v) => (*v).clone(),
            Token::Jmes(v) => to_json(v),
        };
        match v {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }

    /// The token as JSON (owned only when it came from JMESPath).
    pub fn to_json(&self) -> Cow<'_, Value> {
        match self {
            Token::Json(v) => Cow::Borrowed(*v),
            Token::Jmes(v) => Cow::Owned(to_json(v)),
        }
    }
}

use jmes::to_json;

/// Converts a message to a JMESPath variable (once per message).
pub fn to_variable(v: &Value) -> Result<Rcvar, String> {
    Ok(jmes::from_json(v))
}

/// `{...event, "matchedToken": matched}` as a JMESPath variable, sharing the event's members.
pub fn with_matched_token(event: &Rcvar, matched: &Token<'_>) -> Result<Rcvar, String> {
    let m = match matched {
        Token::Json(v) => to_variable(v)?,
        Token::Jmes(v) => v.clone(),
    };
    let mut map = match &**event {
        Variable::Object(o) => o.clone(),
        _ => Default::default(),
    };
    map.insert(super::jsonpath::MATCHED_TOKEN.to_string(), m);
    Ok(Arc::new(Variable::Object(map)))
}

/// Reads an expression member: a string in the template's default language, or
/// `{"value": "...", "language": "JmesPath"}`. Compile errors are reported at the member.
pub(crate) fn read(
    r: &mut Reader<'_>,
    m: &Members<'_, '_>,
    name: &str,
    required: bool,
    default: Language,
    allow_object: bool,
) -> Option<Expression> {
    let node = if required { m.required(r, name)? } else { m.get(name)? };
    let (text, language, at) = match node {
        Node::StringLit(s) => (s.value.to_string(), default, node),
        Node::Object(obj) if allow_object => {
            let em = Members::read(r, obj, &["value", "language"], name);
            let text = em.string(r, "value", true)?;
            let language = match em.string(r, "language", false) {
                None => default,
                Some(l) => match Language::parse(&l) {
                    Some(l) => l,
                    None => {
                        r.error(
                            em.get("language").unwrap_or(node),
                            format!("{name}: unknown language '{l}'; use JsonPath or JmesPath"),
                        );
                        return None;
                    }
                },
            };
            (text, language, em.get("value").unwrap_or(node))
        }
        Node::Object(_) => {
            r.error(node, format!("{name} must be a JSONPath string here; the {{\"value\", \"language\"}} form is for CalculatedContent"));
            return None;
        }
        Node::NullKeyword(_) if !required => return None,
        other => {
            r.error(other, format!("{name} must be a string, not {}", kind_name(other)));
            return None;
        }
    };
    if text.trim().is_empty() {
        r.error(at, format!("{name} is empty"));
        return None;
    }
    match Expression::compile(&text, language) {
        Ok(e) => Some(e),
        Err(why) => {
            r.error(at, format!("{name} `{text}` is not valid {}: {why}", language.name()));
            None
        }
    }
}
