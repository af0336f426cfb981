//! The file as written. Every field is optional here; [`super::validate`]
//! decides what is required, so that the error can say so in plain words.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{OnClaimError, SyncDirection, SyncMode};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Workload {
    pub id: Option<String>,
    pub name: Option<String>,
    pub image: Option<String>,
    pub command: Option<StringOrList>,
    pub volumes: Option<Volumes>,
    pub environment: Option<Environment>,
    pub healthcheck: Option<Healthcheck>,
    pub deploy: Option<Deploy>,
    pub read_only: Option<bool>,
    pub user: Option<String>,
    pub network_mode: Option<String>,
    pub pool: Option<Pool>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub security: Option<Security>,
    pub sync: Option<Sync>,
    pub disconnect: Option<Disconnect>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Disconnect {
    pub replace: Option<bool>,
    pub lost_after: Option<Text>,
    pub reconcile: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Volumes {
    pub state: Option<Mount>,
    pub secrets: Option<Mount>,
    pub comm: Option<Mount>,
    pub custom: Option<Vec<CustomMount>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Mount {
    pub target: String,
    pub read_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CustomMount {
    pub name: Option<String>,
    pub target: String,
    pub read_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Healthcheck {
    pub test: Option<StringOrList>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub retries: Option<u32>,
    pub start_period: Option<Text>,
    pub disable: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Deploy {
    pub resources: Option<Resources>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Resources {
    pub limits: Option<Limits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    pub cpus: Option<Text>,
    pub memory: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Pool {
    pub min_size: Option<u32>,
    pub max_size: Option<u32>,
    pub idle_timeout: Option<Text>,
    pub affinity_timeout: Option<Text>,
    pub fill_concurrency: Option<u32>,
    pub reuse: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Security {
    pub no_new_privileges: Option<bool>,
    pub cap_drop: Option<Vec<String>>,
    pub cap_add: Option<Vec<String>>,
    pub pids_limit: Option<i64>,
    pub non_root: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Sync {
    pub sink: Option<Sink>,
    pub mappings: Option<Vec<Mapping>>,
    pub policy: Option<Policy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Sink {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<String>,
    pub bucket: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub prefix: Option<String>,
    /// The original format's credentials and rclone flags: read so that
    /// the refusal can say why, not as an unknown field.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub rclone_flags: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Mapping {
    pub path: Option<String>,
    pub pattern: Option<String>,
    pub sink_path: Option<String>,
    pub direction: Option<SyncDirection>,
    pub mode: Option<SyncMode>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Policy {
    pub on_claim: Option<bool>,
    pub on_release: Option<bool>,
    pub interval: Option<Text>,
    pub on_claim_error: Option<OnClaimError>,
    pub manual: Option<bool>,
}

/// A scalar read as text, so `cpus: 0.5` and `cpus: "0.5"` both work,
/// as they do in compose files.
pub(super) struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `command: "sh -c ..."` or `command: [sh, -c, ...]`.
pub(super) enum StringOrList {
    One(String),
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringOrList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrList, E> {
                Ok(StringOrList::One(v.to_owned()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StringOrList, A::Error> {
                let mut items = Vec::new();
                while let Some(Text(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(StringOrList::List(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// `environment:` as a map, or as a list of `KEY=value`, like compose.
pub(super) enum Environment {
    Map(BTreeMap<String, Text>),
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for Environment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Environment;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of variables or a list of KEY=value")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Environment, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, Text>()? {
                    out.insert(k, v);
                }
                Ok(Environment::Map(out))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Environment, A::Error> {
                let mut out = Vec::new();
                while let Some(Text(item)) = seq.next_element()? {
                    out.push(item);
                }
                Ok(Environment::List(out))
            }
        }
        d.deserialize_any(V)
    }
}
