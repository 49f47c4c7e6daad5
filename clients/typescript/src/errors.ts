// Entrepot's rich errors, read from a ConnectError: the server attaches exactly one
// google.rpc.ErrorInfo (domain "entrepot", a stable reason) plus BadRequest field
// violations or a PreconditionFailure. These google/rpc types are not in proto/
// (contracts import only our files and well-known types), so the three small
// messages are decoded here with the wire reader instead of generated code.
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Code, ConnectError } from "@connectrpc/connect";

export interface FieldViolation {
  field: string;
  description: string;
}

export interface PreconditionViolation {
  type: string;
  subject: string;
  description: string;
}

export interface EntrepotErrorInfo {
  /** Canonical gRPC code name, e.g. "not_found" (Connect's spelling). */
  code: string;
  message: string;
  reason: string;
  domain: string;
  metadata: Record<string, string>;
  fieldViolations: FieldViolation[];
  preconditionViolations: PreconditionViolation[];
}

const ERROR_INFO = "google.rpc.ErrorInfo";
const BAD_REQUEST = "google.rpc.BadRequest";
const PRECONDITION_FAILURE = "google.rpc.PreconditionFailure";

type Fields = Map<number, Uint8Array[]>;

/** Length-delimited fields of one message, by field number (everything we read is a string or a message). */
function fields(bytes: Uint8Array): Fields {
  const out: Fields = new Map();
  const r = new BinaryReader(bytes);
  while (r.pos < r.len) {
    const [no, wireType] = r.tag();
    if (wireType === 2) {
      const list = out.get(no) ?? [];
      list.push(r.bytes());
      out.set(no, list);
    } else {
      r.skip(wireType);
    }
  }
  return out;
}

const text = new TextDecoder();
const str = (f: Fields, no: number): string => {
  const v = f.get(no);
  return v && v.length ? text.decode(v[v.length - 1]) : "";
};

function decodeErrorInfo(bytes: Uint8Array): Pick<EntrepotErrorInfo, "reason" | "domain" | "metadata"> {
  const f = fields(bytes);
  const metadata: Record<string, string> = {};
  for (const entry of f.get(3) ?? []) {
    const e = fields(entry);
    metadata[str(e, 1)] = str(e, 2);
  }
  return { reason: str(f, 1), domain: str(f, 2), metadata };
}

/** The code, reason, metadata and violations of an error thrown by an Entrepot call. */
export function entrepotError(err: unknown): EntrepotErrorInfo {
  const ce = ConnectError.from(err);
  const info: EntrepotErrorInfo = {
    code: Code[ce.code] ? snake(Code[ce.code]) : String(ce.code),
    message: ce.rawMessage,
    reason: "",
    domain: "",
    metadata: {},
    fieldViolations: [],
    preconditionViolations: [],
  };
  for (const d of ce.details) {
    // Incoming details are raw {type, value}; outgoing ones (server side) do not occur here.
    if (!("type" in d) || !(d.value instanceof Uint8Array)) continue;
    if (d.type === ERROR_INFO) {
      Object.assign(info, decodeErrorInfo(d.value));
    } else if (d.type === BAD_REQUEST) {
      for (const v of fields(d.value).get(1) ?? []) {
        const fv = fields(v);
        info.fieldViolations.push({ field: str(fv, 1), description: str(fv, 2) });
      }
    } else if (d.type === PRECONDITION_FAILURE) {
      for (const v of fields(d.value).get(1) ?? []) {
        const pv = fields(v);
        info.preconditionViolations.push({ type: str(pv, 1), subject: str(pv, 2), description: str(pv, 3) });
      }
    }
  }
  return info;
}

function snake(name: string): string {
  return name.replace(/(?<!^)(?=[A-Z])/g, "_").toLowerCase();
}
