//! Wire commands from the server turned into domain ones: a command that
//! does not decode is answered with the reason, never run.

use std::time::Duration;

use boilerhouse_core::ContainerId;
use boilerhouse_core::container::{ContainerSpec, StateFile};
use boilerhouse_core::workload::SyncDirection;
use boilerhouse_proto::convert::{self, duration_from_pb};
use boilerhouse_proto::pb;

use super::Command;

fn container_id(s: &str) -> Result<ContainerId, String> {
    s.parse()
        .map_err(|e: boilerhouse_core::IdError| e.to_string())
}

fn state_file(w: &pb::WriteStateFile) -> Result<(ContainerId, StateFile), String> {
    let state = w
        .state
        .as_ref()
        .map(StateFile::try_from)
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok((container_id(&w.container_id)?, state.unwrap_or_default()))
}

/// Turns a wire command into a domain one.
pub fn decode_command(command: &pb::Command) -> Result<Command, String> {
    use pb::command::Command as C;
    let Some(inner) = &command.command else {
        return Err("empty command".into());
    };
    Ok(match inner {
        C::Create(c) => {
            let spec = c.spec.as_ref().ok_or("create without a spec")?;
            Command::Create {
                spec: ContainerSpec::try_from(spec).map_err(|e| e.to_string())?,
                start: c.start,
            }
        }
        C::Start(s) => Command::Start(container_id(&s.container_id)?),
        C::Stop(s) => {
            let timeout = s
                .timeout
                .as_ref()
                .map(|d| duration_from_pb("timeout", d))
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or(Duration::from_secs(10));
            Command::Stop(container_id(&s.container_id)?, timeout)
        }
        C::Remove(r) => Command::Remove {
            id: container_id(&r.container_id)?,
            remove_volumes: r.remove_volumes,
        },
        C::UpdateResources(u) => Command::UpdateLimits(
            container_id(&u.container_id)?,
            convert::limits_from_pb_resources(u.limits.as_ref()),
        ),
        C::WriteStateFile(w) => Command::WriteStates(vec![state_file(w)?]),
        C::WriteStateFiles(batch) => Command::WriteStates(
            batch
                .files
                .iter()
                .map(state_file)
                .collect::<Result<_, _>>()?,
        ),
        C::RequestFullReport(_) => Command::FullReport,
        C::RunSync(r) => {
            let spec: boilerhouse_core::workload::SyncSpec =
                serde_json::from_str(&r.sync_spec_json)
                    .map_err(|e| format!("sync_spec_json: {e}"))?;
            let force = match pb::SyncDirection::try_from(r.force_direction) {
                Ok(pb::SyncDirection::Upload) => Some(SyncDirection::Upload),
                Ok(pb::SyncDirection::Download) => Some(SyncDirection::Download),
                Ok(pb::SyncDirection::Bidirectional) => Some(SyncDirection::Bidirectional),
                Ok(pb::SyncDirection::Unspecified) => None,
                Err(_) => return Err(format!("unknown force_direction {}", r.force_direction)),
            };
            Command::Sync(
                container_id(&r.container_id)?,
                crate::sync::SyncJob {
                    tenant: boilerhouse_core::TenantId::new(&r.tenant_id)
                        .map_err(|e| format!("tenant_id: {e}"))?,
                    spec,
                    phase: crate::sync::Phase::parse(&r.direction)?,
                    force,
                    pause: r.pause,
                },
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_decode_one_or_many_and_a_bad_one_names_itself() {
        let id = ContainerId::from_uuid(boilerhouse_core::ids::Uuid::from_u128(7));
        let state = StateFile {
            tenant_id: Some(boilerhouse_core::TenantId::new("t1").unwrap()),
            claim_generation: 3,
            ..Default::default()
        };
        let file = |container_id: String| pb::WriteStateFile {
            container_id,
            state: Some(pb::ContainerStateFile::from(&state)),
        };
        let command = |c| pb::Command {
            command_id: "s".into(),
            generation: 3,
            command: Some(c),
        };
        let one = command(pb::command::Command::WriteStateFile(file(id.to_string())));
        assert_eq!(
            decode_command(&one).unwrap(),
            Command::WriteStates(vec![(id, state.clone())])
        );
        let many = command(pb::command::Command::WriteStateFiles(pb::WriteStateFiles {
            files: vec![file(id.to_string()), file(id.to_string())],
        }));
        assert_eq!(
            decode_command(&many).unwrap(),
            Command::WriteStates(vec![(id, state.clone()), (id, state.clone())])
        );
        let bad = command(pb::command::Command::WriteStateFiles(pb::WriteStateFiles {
            files: vec![file(id.to_string()), file("nope".into())],
        }));
        let error = decode_command(&bad).unwrap_err();
        assert!(error.contains("nope"), "{error}");
    }

    #[test]
    fn unknown_or_empty_commands_are_rejected_with_a_reason() {
        let empty = pb::Command {
            command_id: "c1".into(),
            generation: 0,
            command: None,
        };
        assert!(decode_command(&empty).is_err());
        let bad_id = pb::Command {
            command_id: "c2".into(),
            generation: 0,
            command: Some(pb::command::Command::Start(pb::StartContainer {
                container_id: "nope".into(),
            })),
        };
        assert!(
            decode_command(&bad_id)
                .unwrap_err()
                .contains("container id")
        );
    }
}
