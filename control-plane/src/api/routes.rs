//! The route tables of the HTTPS API: every admin route ([`ROUTES`]) and the console's sign-in
//! routes ([`SESSION_ROUTES`]), each with what the OpenAPI document says of it: its query
//! parameters, its body, its answer and the refusals particular to it. `openapi.rs` renders
//! the document from these tables alone (path parameters follow from the path, refusals every
//! route shares from what the route has), `allowed_methods` answers `Allow` from them, and the
//! tests prove every route is served and checks the admin key. A route added to the router
//! and not here is missing from the document; `admin_api`'s agreement test finds it.

/// One route: method, path (OpenAPI template), and what the document says of it.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    /// The `operationId`.
    pub operation: &'static str,
    pub summary: &'static str,
    pub query: &'static [Param],
    /// Header parameters (besides the credentials).
    pub headers: &'static [Param],
    pub body: Body,
    pub answer: Answer,
    /// Refusals particular to this route (status, when). Those every route of its kind can
    /// answer (401, 404 for an unknown id, 400 and 413 for a body, 503, ...) are added by the
    /// document.
    pub refusals: &'static [(u16, &'static str)],
}

/// A query parameter.
pub struct Param {
    pub name: &'static str,
    pub schema: Schema,
    pub required: bool,
    pub description: &'static str,
}

/// What a query parameter holds, as the handlers parse it.
#[derive(Clone, Copy)]
pub enum Schema {
    /// A non-negative 64-bit integer (decimal digits).
    U64,
    /// An integer in `min..=max`.
    Int { min: u64, max: u64 },
    /// A page size: 1 to the server's page limit, 100 by default.
    Limit,
    /// Any text.
    Text,
    /// Text matching this pattern.
    Pattern(&'static str),
    /// One of these; the first is the default when `default` is set.
    Enum {
        values: &'static [&'static str],
        default: Option<&'static str>,
    },
    /// A comma-separated list of these, one at least.
    EnumList(&'static [&'static str]),
    /// A comma-separated list of ids (empty: none).
    U64List,
}

/// A route's request body.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    /// JSON of this component schema.
    Json {
        schema: &'static str,
        required: bool,
    },
    /// Whatever the Docker engine takes, passed through as it is.
    Raw,
}

/// A route's answer when it succeeds.
#[derive(Clone, Copy)]
pub enum Answer {
    /// JSON of this component schema, with this status.
    One(u16, &'static str),
    /// A JSON array of this component schema, with this status.
    Many(u16, &'static str),
    /// 200: a page (a JSON array) of this component schema, the total in `X-Total-Count`.
    Page(&'static str),
    /// 204, no body.
    NoContent,
    /// 200: the install command, as JSON or, for `Accept: text/plain`, as text.
    Install,
    /// 200: a compose file (`application/yaml`).
    ComposeFile,
    /// Whatever the Docker engine answers, passed through.
    Docker,
    /// 101: a WebSocket.
    WebSocket,
    /// 200: the OpenAPI document itself.
    Document,
    /// 200: a new session (`Session`), its cookie set.
    SignedIn,
    /// 204: the session cookie cleared.
    SignedOut,
}

impl Route {
    const fn new(
        method: &'static str,
        path: &'static str,
        operation: &'static str,
        summary: &'static str,
        answer: Answer,
    ) -> Self {
        Self {
            method,
            path,
            operation,
            summary,
            query: &[],
            headers: &[],
            body: Body::None,
            answer,
            refusals: &[],
        }
    }

    const fn query(mut self, query: &'static [Param]) -> Self {
        self.query = query;
        self
    }

    const fn headers(mut self, headers: &'static [Param]) -> Self {
        self.headers = headers;
        self
    }

    /// A required JSON body of component `schema`.
    const fn body(mut self, schema: &'static str) -> Self {
        self.body = Body::Json {
            schema,
            required: true,
        };
        self
    }

    /// An optional JSON body of component `schema` (absent or blank: the defaults).
    const fn optional_body(mut self, schema: &'static str) -> Self {
        self.body = Body::Json {
            schema,
            required: false,
        };
        self
    }

    const fn raw_body(mut self) -> Self {
        self.body = Body::Raw;
        self
    }

    const fn refuses(mut self, refusals: &'static [(u16, &'static str)]) -> Self {
        self.refusals = refusals;
        self
    }

    /// Whether the route is the Docker Engine API through a tunnel.
    pub fn is_docker(&self) -> bool {
        matches!(self.answer, Answer::Docker)
    }
}

const fn param(name: &'static str, schema: Schema, description: &'static str) -> Param {
    Param {
        name,
        schema,
        required: false,
        description,
    }
}

const START: Param = param("start", Schema::U64, "offset of the first item (default 0)");
const LIMIT: Param = param(
    "limit",
    Schema::Limit,
    "how many items at most (default 100)",
);
const PAGE: &[Param] = &[START, LIMIT];

/// Deploy statuses of an edge stack's environments (`targets::status_name`).
pub const DEPLOY_STATUSES: &[&str] = &[
    "pending",
    "acknowledged",
    "imagesPulled",
    "deploying",
    "running",
    "error",
    "removing",
    "removed",
];

const ENV_LIST: &[Param] = &[
    START,
    LIMIT,
    param(
        "search",
        Schema::Text,
        "case-insensitive substring of the name or the Edge ID (blank: none)",
    ),
    param(
        "status",
        Schema::EnumList(&["up", "down", "never"]),
        "comma-separated statuses, any of which matches",
    ),
    param(
        "mode",
        Schema::Enum {
            values: &["standard", "async"],
            default: None,
        },
        "only environments of this mode",
    ),
    param("groupId", Schema::U64, "only environments of this group"),
    param(
        "tagIds",
        Schema::U64List,
        "comma-separated tag ids, every one of which an environment must have",
    ),
];

const STATUS_PAGE: &[Param] = &[
    param(
        "status",
        Schema::Enum {
            values: &[
                "",
                "pending",
                "acknowledged",
                "imagesPulled",
                "deploying",
                "running",
                "error",
                "removing",
                "removed",
            ],
            default: None,
        },
        "only environments at this status (empty: all); `pending`: targeted, nothing reported \
         for the counted version yet",
    ),
    START,
    LIMIT,
];

const FILE_QUERY: &[Param] = &[
    Param {
        name: "environmentId",
        schema: Schema::U64,
        required: true,
        description: "the environment whose values are substituted",
    },
    param(
        "version",
        Schema::Int {
            min: 1,
            max: u32::MAX as u64,
        },
        "the version (default: the newest)",
    ),
];

const INSTALL_QUERY: &[Param] = &[param(
    "platform",
    Schema::Enum {
        values: &["docker", "swarm", "kubernetes", "nomad"],
        default: Some("docker"),
    },
    "where the agent runs",
)];

const SNAPSHOT_QUERY: &[Param] = &[param(
    "section",
    Schema::Enum {
        values: &[
            "engine",
            "containers",
            "images",
            "volumes",
            "networks",
            "stacks",
        ],
        default: None,
    },
    "only this part of the snapshot, as `{\"<section>\": ...}` (default: all of it)",
)];

const DOCKER_SUMMARY: &str = "Docker Engine API of the environment through its tunnel, opened on demand; \
     streaming answers stream. The engine's answer (any status, any content) is passed through; the \
     statuses listed with an `Error` body are the proxy's own. A hijack (attach, exec start with \
     `Upgrade: tcp`) must be the first request of its connection (the docker CLI does so), \
     else 421";

const DOCKER_REFUSALS: &[(u16, &str)] = &[
    (400, "a request the engine connection cannot carry"),
    (
        404,
        "the environment does not exist (or the engine's own 404, passed through)",
    ),
    (
        409,
        "the environment is in async mode: it has no tunnel (queue commands instead)",
    ),
    (
        421,
        "a hijack (`Upgrade: tcp`) that is not the first request of its connection",
    ),
    (
        502,
        "the tunnel or its gateway failed, or the agent cannot reach its engine",
    ),
    (
        503,
        "the tunnel carries as many streams as it may, or the store is unavailable",
    ),
    (504, "the agent did not open its tunnel in time"),
];

const fn docker(method: &'static str, operation: &'static str) -> Route {
    Route::new(
        method,
        "/api/endpoints/{id}/docker/{path}",
        operation,
        DOCKER_SUMMARY,
        Answer::Docker,
    )
    .raw_body()
    .refuses(DOCKER_REFUSALS)
}

const WS_HANDSHAKE: &[Param] = &[
    Param {
        name: "Upgrade",
        schema: Schema::Pattern("^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$"),
        required: true,
        description: "websocket (any case)",
    },
    Param {
        name: "Sec-WebSocket-Key",
        schema: Schema::Text,
        required: true,
        description: "the handshake's nonce",
    },
    Param {
        name: "Sec-WebSocket-Version",
        schema: Schema::Enum {
            values: &["13"],
            default: None,
        },
        required: true,
        description: "13",
    },
];

const ROLLOUT_CONTROL: &[(u16, &str)] = &[(
    409,
    "the stack has no rollout, its rollout is not in a state this applies to, or it \
     changed meanwhile (read it and ask again)",
)];

pub const ROUTES: &[Route] = &[
    // Environments.
    Route::new(
        "GET",
        "/api/endpoints",
        "listEnvironments",
        "A page of environments, filtered; X-Total-Count holds how many matched",
        Answer::Page("Environment"),
    )
    .query(ENV_LIST),
    Route::new(
        "POST",
        "/api/endpoints",
        "createEnvironment",
        "Create an edge environment; its edgeKey is the join token of its agent",
        Answer::One(201, "Environment"),
    )
    .body("NewEnvironment")
    .refuses(&[(422, "groupId or a tagId names nothing that exists")]),
    Route::new(
        "GET",
        "/api/endpoints/summary",
        "fleetSummary",
        "Counts of the whole fleet: total, by status (up, down, never), by mode, and by group \
         (0: in no group) with each group's statuses; and the environments that went down most \
         recently",
        Answer::One(200, "Summary"),
    ),
    Route::new(
        "POST",
        "/api/endpoints/bulk",
        "createEnvironments",
        "Create many environments at once (all or none)",
        Answer::Many(201, "Environment"),
    )
    .body("NewEnvironments")
    .refuses(&[
        (
            413,
            "more environments than one call may create, or a JSON body over 4 MiB",
        ),
        (
            422,
            "an item's groupId or a tagId names nothing that exists",
        ),
    ]),
    Route::new(
        "GET",
        "/api/endpoints/{id}",
        "getEnvironment",
        "One environment",
        Answer::One(200, "Environment"),
    ),
    Route::new(
        "PATCH",
        "/api/endpoints/{id}",
        "changeEnvironment",
        "Change an environment: the fields given change (null: back to the default)",
        Answer::One(200, "Environment"),
    )
    .body("EnvironmentChange")
    .refuses(&[(422, "groupId or a tagId names nothing that exists")]),
    Route::new(
        "DELETE",
        "/api/endpoints/{id}",
        "deleteEnvironment",
        "Delete an environment (its agent is refused from then on)",
        Answer::NoContent,
    ),
    Route::new(
        "POST",
        "/api/endpoints/{id}/association",
        "resetAssociation",
        "Forget the bound Edge ID and issue a new join token",
        Answer::One(200, "Environment"),
    ),
    Route::new(
        "GET",
        "/api/endpoints/{id}/install",
        "installCommand",
        "The install command or manifest of the environment's agent, carrying its join token",
        Answer::Install,
    )
    .query(INSTALL_QUERY),
    Route::new(
        "GET",
        "/api/endpoints/{id}/snapshot",
        "getSnapshot",
        "The latest snapshot of the environment's engine, with when it was taken and received",
        Answer::One(200, "SnapshotAnswer"),
    )
    .query(SNAPSHOT_QUERY)
    .refuses(&[(
        404,
        "the environment does not exist or has sent no snapshot yet",
    )]),
    Route::new(
        "POST",
        "/api/endpoints/{id}/commands",
        "queueCommand",
        "Queue a command for an async environment; 201 with the command",
        Answer::One(201, "Command"),
    )
    .body("NewCommand")
    .refuses(&[
        (
            409,
            "the environment is in standard mode, or holds as many unfinished commands as it may",
        ),
        (422, "stackDeploy: the compose file does not check out"),
    ]),
    Route::new(
        "GET",
        "/api/endpoints/{id}/commands",
        "listCommands",
        "An async environment's commands, newest first; X-Total-Count holds how many are kept",
        Answer::Page("Command"),
    )
    .query(PAGE),
    docker("GET", "dockerGet"),
    docker("HEAD", "dockerHead"),
    docker("POST", "dockerPost"),
    docker("PUT", "dockerPut"),
    docker("DELETE", "dockerDelete"),
    docker("PATCH", "dockerPatch"),
    docker("OPTIONS", "dockerOptions"),
    Route::new(
        "GET",
        "/api/endpoints/{id}/exec/{execId}/ws",
        "execTerminal",
        "The terminal of an exec (created with Tty through the Docker proxy) as a WebSocket \
         (a handshake: also `Connection: Upgrade`): binary frames both ways. The exec is started \
         before the handshake is answered, so an unknown exec or a missing tunnel is an HTTP \
         error. A handshake with an Origin must come from this server's own; one signed in \
         with the session cookie (not X-API-Key) must send its Origin",
        Answer::WebSocket,
    )
    .headers(WS_HANDSHAKE)
    .refuses(&[
        (
            400,
            "an exec id that is not 1 to 128 letters and digits, or not a WebSocket handshake",
        ),
        (
            403,
            "an Origin other than this server's, or none with the session cookie",
        ),
        (404, "the environment or the exec does not exist"),
        (
            409,
            "the environment is in async mode, or the engine refused to start the exec",
        ),
        (
            502,
            "the tunnel or its gateway failed, or the engine answered the exec start unexpectedly",
        ),
        (
            503,
            "the tunnel carries as many streams as it may, or the store is unavailable",
        ),
        (504, "the agent did not open its tunnel in time"),
    ]),
    // Groups and tags.
    Route::new(
        "GET",
        "/api/groups",
        "listGroups",
        "Every group, with its tags",
        Answer::Many(200, "Group"),
    ),
    Route::new(
        "POST",
        "/api/groups",
        "createGroup",
        "Create a group",
        Answer::One(201, "Group"),
    )
    .body("NewGroup")
    .refuses(&[
        (409, "a group of this name exists"),
        (422, "a tagId names nothing that exists"),
    ]),
    Route::new(
        "PATCH",
        "/api/groups/{id}",
        "changeGroup",
        "Rename a group or set its tags",
        Answer::One(200, "Group"),
    )
    .body("GroupChange")
    .refuses(&[
        (409, "a group of this name exists"),
        (422, "a tagId names nothing that exists"),
    ]),
    Route::new(
        "DELETE",
        "/api/groups/{id}",
        "deleteGroup",
        "Delete a group no environment is in",
        Answer::NoContent,
    )
    .refuses(&[(409, "environments are in the group")]),
    Route::new(
        "GET",
        "/api/tags",
        "listTags",
        "Every tag",
        Answer::Many(200, "Tag"),
    ),
    Route::new(
        "POST",
        "/api/tags",
        "createTag",
        "Create a tag",
        Answer::One(201, "Tag"),
    )
    .body("NewTag")
    .refuses(&[(409, "a tag of this name exists")]),
    Route::new(
        "PATCH",
        "/api/tags/{id}",
        "changeTag",
        "Rename a tag",
        Answer::One(200, "Tag"),
    )
    .body("TagChange")
    .refuses(&[(409, "a tag of this name exists")]),
    Route::new(
        "DELETE",
        "/api/tags/{id}",
        "deleteTag",
        "Delete a tag no environment, group or dynamic edge group uses",
        Answer::NoContent,
    )
    .refuses(&[(
        409,
        "an environment has the tag, a group carries it or a dynamic edge group selects by it",
    )]),
    // Edge groups.
    Route::new(
        "GET",
        "/api/edge_groups",
        "listEdgeGroups",
        "A page of edge groups; X-Total-Count holds how many there are",
        Answer::Page("EdgeGroup"),
    )
    .query(PAGE),
    Route::new(
        "POST",
        "/api/edge_groups",
        "createEdgeGroup",
        "Create an edge group: dynamic (tagIds and match select its members) or static (it \
         lists its environmentIds)",
        Answer::One(201, "EdgeGroup"),
    )
    .body("NewEdgeGroup")
    .refuses(&[
        (409, "an edge group of this name exists"),
        (422, "a tagId or an environmentId names nothing that exists"),
    ]),
    Route::new(
        "GET",
        "/api/edge_groups/{id}",
        "getEdgeGroup",
        "One edge group",
        Answer::One(200, "EdgeGroup"),
    ),
    Route::new(
        "PATCH",
        "/api/edge_groups/{id}",
        "changeEdgeGroup",
        "Change an edge group (the fields given; a group that changes kind drops what belonged \
         to the other)",
        Answer::One(200, "EdgeGroup"),
    )
    .body("EdgeGroupChange")
    .refuses(&[
        (
            409,
            "an edge group of this name exists, or the change does not fit the group's kind \
             (a dynamic group without tags, a static group with tags, ...)",
        ),
        (422, "a tagId or an environmentId names nothing that exists"),
    ]),
    Route::new(
        "DELETE",
        "/api/edge_groups/{id}",
        "deleteEdgeGroup",
        "Delete an edge group no edge stack targets",
        Answer::NoContent,
    )
    .refuses(&[(409, "edge stacks target the group")]),
    Route::new(
        "GET",
        "/api/edge_groups/{id}/environments",
        "listEdgeGroupMembers",
        "A page of the group's current members, as environments; X-Total-Count holds how many",
        Answer::Page("Environment"),
    )
    .query(PAGE),
    // Edge stacks.
    Route::new(
        "GET",
        "/api/edge_stacks",
        "listEdgeStacks",
        "A page of edge stacks; X-Total-Count holds how many there are",
        Answer::Page("EdgeStack"),
    )
    .query(PAGE),
    Route::new(
        "POST",
        "/api/edge_stacks",
        "createEdgeStack",
        "Create an edge stack; 201 with its id and version 1, whose rollout starts",
        Answer::One(201, "EdgeStack"),
    )
    .body("NewEdgeStack")
    .refuses(&[
        (409, "an edge stack of this name exists"),
        (
            422,
            "the compose file does not check out, or an edgeGroupId names nothing that exists",
        ),
    ]),
    Route::new(
        "GET",
        "/api/edge_stacks/{id}",
        "getEdgeStack",
        "One edge stack, with how many environments it targets, its rollout, and how many are \
         at each status for the version its rollout brings (counts)",
        Answer::One(200, "EdgeStackDetail"),
    ),
    Route::new(
        "PUT",
        "/api/edge_stacks/{id}",
        "changeEdgeStack",
        "Change an edge stack: a new compose makes the next version (and starts its rollout); \
         edgeGroupIds and variables change in place",
        Answer::One(200, "EdgeStack"),
    )
    .body("EdgeStackChange")
    .refuses(&[
        (
            409,
            "another version came after baseVersion, the name differs from the stack's (it \
             cannot change), or the rollout kept changing meanwhile",
        ),
        (
            422,
            "the compose file does not check out, or an edgeGroupId names nothing that exists",
        ),
    ]),
    Route::new(
        "DELETE",
        "/api/edge_stacks/{id}",
        "deleteEdgeStack",
        "Delete an edge stack and its versions",
        Answer::NoContent,
    ),
    Route::new(
        "GET",
        "/api/edge_stacks/{id}/status",
        "listEdgeStackStatuses",
        "A page of the stack's environments with their status, by environment id; \
         X-Total-Count holds how many",
        Answer::Page("StackStatus"),
    )
    .query(STATUS_PAGE),
    Route::new(
        "GET",
        "/api/edge_stacks/{id}/file",
        "getEdgeStackFile",
        "The compose file of a version as one environment gets it, its variables substituted",
        Answer::ComposeFile,
    )
    .query(FILE_QUERY)
    .refuses(&[
        (
            404,
            "the stack, the environment or the version does not exist",
        ),
        (
            422,
            "a variable of the file has no value for this environment",
        ),
    ]),
    Route::new(
        "GET",
        "/api/edge_stacks/{id}/versions",
        "listEdgeStackVersions",
        "The kept versions of an edge stack, newest first, without their files",
        Answer::Many(200, "StackVersion"),
    ),
    Route::new(
        "GET",
        "/api/edge_stacks/{id}/versions/{n}",
        "getEdgeStackVersion",
        "One kept version of an edge stack, with its compose file",
        Answer::One(200, "StackVersion"),
    )
    .refuses(&[(404, "the stack does not exist or keeps no such version")]),
    Route::new(
        "POST",
        "/api/edge_stacks/{id}/rollout/pause",
        "pauseRollout",
        "Pause a rolling rollout: no further batches",
        Answer::One(200, "Rollout"),
    )
    .refuses(ROLLOUT_CONTROL),
    Route::new(
        "POST",
        "/api/edge_stacks/{id}/rollout/resume",
        "resumeRollout",
        "Resume a paused rollout (the failures it paused for no longer count)",
        Answer::One(200, "Rollout"),
    )
    .refuses(ROLLOUT_CONTROL),
    Route::new(
        "POST",
        "/api/edge_stacks/{id}/rollout/abort",
        "abortRollout",
        "Stop a rolling or paused rollout for good (released environments keep the new version)",
        Answer::One(200, "Rollout"),
    )
    .refuses(ROLLOUT_CONTROL),
    Route::new(
        "POST",
        "/api/edge_stacks/{id}/rollback",
        "rollBack",
        "Every target back to a kept version, at once",
        Answer::One(200, "Rollout"),
    )
    .optional_body("Rollback")
    .refuses(&[
        (404, "the stack does not exist or keeps no such version"),
        (409, "the rollout changed meanwhile (read it and ask again)"),
    ]),
    // Settings and this document.
    Route::new(
        "GET",
        "/api/settings",
        "getSettings",
        "The default intervals",
        Answer::One(200, "Settings"),
    ),
    Route::new(
        "PATCH",
        "/api/settings",
        "changeSettings",
        "Change default intervals: the fields given change",
        Answer::One(200, "Settings"),
    )
    .body("SettingsChange"),
    Route::new(
        "PUT",
        "/api/settings",
        "putSettings",
        "Change default intervals (as PATCH: the fields given change)",
        Answer::One(200, "Settings"),
    )
    .body("SettingsChange"),
    Route::new(
        "GET",
        "/api/openapi.json",
        "openapi",
        "This document",
        Answer::Document,
    ),
];

/// The web console's sign-in routes: outside the admin check, since they are how a browser
/// gets past it (`api::console`).
pub const SESSION_ROUTES: &[Route] = &[
    Route::new(
        "POST",
        "/api/auth/session",
        "signIn",
        "Sign in with the admin key: sets the session cookie (HttpOnly, Secure, \
         SameSite=Strict) and answers the CSRF token that requests other than GET must carry \
         in X-CSRF-Token",
        Answer::SignedIn,
    )
    .body("SignIn")
    .refuses(&[
        (401, "the key is not the admin key"),
        (408, "the body did not arrive within 10 s"),
        (413, "a body over 1024 bytes"),
    ]),
    Route::new(
        "GET",
        "/api/auth/session",
        "currentSession",
        "The current session's CSRF token and expiry",
        Answer::One(200, "Session"),
    )
    .refuses(&[(
        401,
        "no session cookie, or one that is not valid (any more)",
    )]),
    Route::new(
        "DELETE",
        "/api/auth/session",
        "signOut",
        "Sign out: the browser drops the session cookie",
        Answer::SignedOut,
    ),
];
