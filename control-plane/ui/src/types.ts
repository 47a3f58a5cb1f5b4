// The admin API's JSON shapes, as control-plane/src/api/*.rs serialises them.

export type Status = 'up' | 'down' | 'never';
export type Mode = 'standard' | 'async';
export type TunnelState = 'closed' | 'requested' | 'open';

export interface Environment {
  id: number;
  name: string;
  mode: Mode;
  edgeId: string | null;
  edgeKey: string;
  status: Status;
  lastCheckIn: string | null;
  checkinInterval: number;
  pingInterval: number;
  snapshotInterval: number;
  commandInterval: number;
  groupId: number | null;
  tagIds: number[];
  envVars: string[];
  variables?: Record<string, string>;
  allowSelfSigned: boolean;
  createdAt: string;
  tunnel: {
    state: TunnelState;
    gateway: string | null;
    epoch?: number | null;
    since?: string | null;
  };
}

export interface StatusCounts {
  up: number;
  down: number;
  never: number;
}

export interface Summary {
  total: number;
  status: StatusCounts;
  mode: { standard: number; async: number };
  /** By group id ("0": in no group). */
  groups: Record<string, StatusCounts>;
  /** Newest first; absent on servers that predate it. */
  recentlyDown?: { id: number; name: string; lastCheckIn: string | null }[];
}

export interface Group {
  id: number;
  name: string;
  tagIds?: number[];
}

export interface Tag {
  id: number;
  name: string;
}

export interface Settings {
  checkinInterval: number;
  pingInterval: number;
  snapshotInterval: number;
  commandInterval: number;
}

export type Platform = 'docker' | 'swarm' | 'kubernetes' | 'nomad';

export interface Install {
  platform: Platform;
  command: string;
}

// Snapshots (proto::snapshot).
export interface SnapContainer {
  id: string;
  names: string[];
  image: string;
  imageId: string;
  command: string;
  state: string;
  created: number;
  labels: Record<string, string>;
  ports: string[];
}

export interface SnapImage {
  id: string;
  tags: string[];
  size: number;
  created: number;
}

export interface SnapVolume {
  name: string;
  driver: string;
  mountpoint: string;
}

export interface SnapNetwork {
  id: string;
  name: string;
  driver: string;
  scope: string;
}

export interface SnapStack {
  name: string;
  services: string[];
  containers: number;
  running: number;
}

export interface EngineInfo {
  name: string;
  version: string;
  apiVersion: string;
  os: string;
  arch: string;
  kernelVersion: string;
  cpus: number;
  memoryBytes: number;
}

export interface SnapshotView {
  environmentId: number;
  takenAt: string;
  receivedAt: string;
  snapshot: {
    takenMs: number;
    engine: EngineInfo;
    containers: SnapContainer[];
    images: SnapImage[];
    volumes: SnapVolume[];
    networks: SnapNetwork[];
    stacks: SnapStack[];
  };
}

// Async commands.
export type CommandType =
  | 'containerStart'
  | 'containerStop'
  | 'containerRestart'
  | 'containerKill'
  | 'containerRemove'
  | 'imageRemove'
  | 'volumeRemove'
  | 'stackRemove'
  | 'stackDeploy';

export type CommandState = 'pending' | 'sent' | 'succeeded' | 'failed';

export interface Command {
  id: number;
  type: CommandType;
  target: string;
  force?: boolean;
  timeoutSecs?: number;
  signal?: string;
  services?: string[];
  state: CommandState;
  createdAt: string;
  sentAt: string | null;
  finishedAt: string | null;
  error: string | null;
}

export interface NewCommand {
  type: CommandType;
  target: string;
  force?: boolean;
  timeoutSecs?: number;
  signal?: string;
  compose?: string;
}

// Docker Engine API (only the fields the console reads).
export interface DockerContainer {
  Id: string;
  Names: string[];
  Image: string;
  Command: string;
  Created: number;
  State: string;
  Status: string;
  Ports?: { IP?: string; PrivatePort: number; PublicPort?: number; Type: string }[];
  Labels?: Record<string, string> | null;
}

// Edge groups and stacks.
export interface EdgeGroup {
  id: number;
  name: string;
  dynamic: boolean;
  tagIds: number[];
  match: 'any' | 'all';
  environmentIds: number[];
}

export type RolloutState = 'idle' | 'rolling' | 'paused' | 'rollingBack' | 'done' | 'aborted';

export interface RolloutConfig {
  batchSize?: number | null;
  batchGrowth?: 'fixed' | 'double';
  waitSecs?: number;
  batchTimeoutSecs?: number;
  failureThreshold?: number;
  onFailure?: 'pause' | 'rollback' | 'continue';
}

export interface Rollout {
  state: RolloutState;
  targetVersion: number;
  fromVersion: number;
  batch: number;
  released: number;
  nextBatchAt?: string;
  reason?: string;
  config: RolloutConfig;
  updatedAt: string;
}

export interface EdgeStack {
  id: number;
  name: string;
  version: number;
  edgeGroupIds: number[];
  variables: Record<string, string>;
  createdAt: string;
  /** Only on GET /api/edge_stacks/{id} (and lists that carry it). */
  targets?: number;
  counts?: Record<string, number>;
  rollout?: Rollout;
}

export interface StackVersion {
  version: number;
  createdAt: string;
  compose?: string;
}

export type DeployStatus =
  | 'pending'
  | 'acknowledged'
  | 'imagesPulled'
  | 'deploying'
  | 'running'
  | 'error'
  | 'removing'
  | 'removed';

export const DEPLOY_STATUSES: DeployStatus[] = [
  'pending',
  'acknowledged',
  'imagesPulled',
  'deploying',
  'running',
  'error',
  'removing',
  'removed',
];

export interface StackStatus {
  environmentId: number;
  status: DeployStatus;
  version: number | null;
  error: string | null;
  updatedAt: string | null;
}

export interface Session {
  csrfToken: string;
  expiresAt: string;
}
