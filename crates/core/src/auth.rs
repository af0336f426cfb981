//! Who may call what: principals, token scopes, and the one table that
//! says which principals each RPC admits.
//!
//! The server authenticates (a bearer token, or a node's client
//! certificate) and asks [`authorize`]; handlers of tenant-scoped methods
//! then call [`Principal::may_act_for`] with the tenant the request names.
//! Every RPC must appear in [`access_for`]: an unlisted method is refused,
//! so a new RPC is closed until someone decides who may call it.

use std::fmt;

use crate::{NodeId, TenantId};

/// What a bearer token allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Workloads, pools, nodes, boosts, reconcile, drain, and the tenant
    /// RPCs for any tenant (the scope of a platform's backend).
    Operator,
    /// Claim, Release, Touch, and reads of this tenant's own claims,
    /// reservations and sync status.
    Tenant(TenantId),
}

impl Scope {
    /// Parses `admin`, `operator` or `tenant:<id>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Self::Admin),
            "operator" => Ok(Self::Operator),
            _ => match s.strip_prefix("tenant:") {
                Some(id) => TenantId::new(id)
                    .map(Self::Tenant)
                    .map_err(|e| format!("scope {s:?}: {e}")),
                None => Err(format!(
                    "scope {s:?} is not one of admin, operator, tenant:<id>"
                )),
            },
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admin => f.write_str("admin"),
            Self::Operator => f.write_str("operator"),
            Self::Tenant(t) => write!(f, "tenant:{t}"),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A bearer token: its name in the token file and its scope.
    Token {
        /// The token's name (never the secret).
        name: String,
        /// What it allows.
        scope: Scope,
    },
    /// An agent, named by its client certificate.
    Node(NodeId),
    /// Any caller of a server started with `--insecure`: no TLS, no
    /// tokens. It may do everything, and agents name themselves.
    Insecure,
}

impl Principal {
    /// Whether this caller may act for `tenant` in a tenant-scoped method.
    pub fn may_act_for(&self, tenant: &TenantId) -> Result<(), Denied> {
        match self {
            Self::Token {
                scope: Scope::Tenant(own),
                name,
            } if own != tenant => Err(Denied::permission(format!(
                "token {name:?} has scope tenant:{own} and cannot act for tenant {tenant}"
            ))),
            Self::Node(node) => Err(Denied::permission(format!(
                "node {node} cannot act for tenants"
            ))),
            _ => Ok(()),
        }
    }

    /// The tenant a tenant-scoped token is bound to, if any: list methods
    /// use it as their filter.
    pub fn own_tenant(&self) -> Option<&TenantId> {
        match self {
            Self::Token {
                scope: Scope::Tenant(t),
                ..
            } => Some(t),
            _ => None,
        }
    }
}

impl fmt::Display for Principal {
    /// How events record the caller: `token:<name> (<scope>)`,
    /// `node:<name>` or `insecure`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token { name, scope } => write!(f, "token:{name} ({scope})"),
            Self::Node(node) => write!(f, "node:{node}"),
            Self::Insecure => f.write_str("insecure"),
        }
    }
}

/// Who a method admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, authenticated or not: health checks.
    Public,
    /// Any authenticated caller: reflection (the schema only).
    AnyCaller,
    /// Only an agent with a node certificate.
    Node,
    /// A tenant token for the tenant the request names, or an operator or
    /// admin for any tenant. The handler checks the tenant.
    Tenant,
    /// Operator or admin.
    Operator,
    /// Admin only: what can copy or replace the whole installation's
    /// state (a backup holds every tenant's assignment and history).
    Admin,
}

/// Why a caller was turned away; maps to a gRPC code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No credentials, or credentials that are not valid.
    Unauthenticated(String),
    /// Valid credentials without the right.
    PermissionDenied(String),
}

impl Denied {
    fn permission(message: String) -> Self {
        Self::PermissionDenied(message)
    }
}

const TENANT_METHODS: &[&str] = &[
    "/boilerhouse.v1.ClaimService/Claim",
    "/boilerhouse.v1.ClaimService/Release",
    "/boilerhouse.v1.ClaimService/Touch",
    "/boilerhouse.v1.ClaimService/GetClaim",
    "/boilerhouse.v1.ClaimService/ListClaims",
    "/boilerhouse.v1.AffinityService/ListReservations",
    "/boilerhouse.v1.SyncService/GetSyncStatus",
    "/boilerhouse.v1.SyncService/WatchSyncStatus",
];

/// Services whose every method needs operator scope. A method listed in
/// [`TENANT_METHODS`] is the exception.
const OPERATOR_SERVICES: &[&str] = &[
    "boilerhouse.v1.WorkloadService",
    "boilerhouse.v1.PoolService",
    "boilerhouse.v1.ClaimService",
    "boilerhouse.v1.AffinityService",
    "boilerhouse.v1.ContainerService",
    "boilerhouse.v1.NodeService",
    "boilerhouse.v1.BoostService",
    "boilerhouse.v1.SyncService",
    "boilerhouse.v1.EventService",
    "boilerhouse.v1.ReconcileService",
    "boilerhouse.v1.SystemService",
];

/// Services whose every method needs admin scope.
const ADMIN_SERVICES: &[&str] = &["boilerhouse.v1.AdminService"];

/// Who may call the gRPC method at `path` (`/package.Service/Method`);
/// `None` for a method nobody decided on, which is refused.
pub fn access_for(path: &str) -> Option<Access> {
    if TENANT_METHODS.contains(&path) {
        return Some(Access::Tenant);
    }
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if method.is_empty() || method.contains('/') {
        return None;
    }
    match service {
        "grpc.health.v1.Health" => Some(Access::Public),
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            Some(Access::AnyCaller)
        }
        "boilerhouse.v1.AgentService" if method == "Connect" => Some(Access::Node),
        s if OPERATOR_SERVICES.contains(&s) => Some(Access::Operator),
        s if ADMIN_SERVICES.contains(&s) => Some(Access::Admin),
        _ => None,
    }
}

/// Whether `caller` (None: no credentials) may call a method of `access`.
/// Tenant methods pass here for a tenant token of any tenant; the handler
/// then checks the tenant it names.
pub fn authorize(caller: Option<&Principal>, method: &str) -> Result<(), Denied> {
    let Some(access) = access_for(method) else {
        return Err(Denied::PermissionDenied(format!(
            "{method} is not a method this server admits anyone to"
        )));
    };
    if access == Access::Public {
        return Ok(());
    }
    let Some(caller) = caller else {
        return Err(Denied::Unauthenticated(match access {
            Access::Node => format!("{method} needs a node's client certificate"),
            _ => format!("{method} needs a bearer token: send `authorization: Bearer <token>`"),
        }));
    };
    let scope = match caller {
        Principal::Insecure => return Ok(()),
        Principal::Node(node) => {
            return if access == Access::Node {
                Ok(())
            } else {
                Err(Denied::permission(format!(
                    "{method} is not for agents; node {node}'s certificate may only open AgentService.Connect"
                )))
            };
        }
        Principal::Token { scope, .. } => scope,
    };
    let needed = match access {
        Access::Public | Access::AnyCaller => return Ok(()),
        Access::Node => {
            return Err(Denied::permission(format!(
                "{method} needs a node's client certificate, not a bearer token"
            )));
        }
        Access::Tenant => return Ok(()),
        Access::Operator => "operator or admin",
        Access::Admin => "admin",
    };
    match (scope, access) {
        (Scope::Admin, _) | (Scope::Operator, Access::Operator) => Ok(()),
        _ => Err(Denied::permission(format!(
            "{method} needs scope {needed}; {caller} does not have it"
        ))),
    }
}

#[cfg(test)]
mod tests;
