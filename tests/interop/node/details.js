// Decodes the standard `grpc-status-details-bin` trailer (a google.rpc.Status)
// into what a sandhub caller switches on: google.rpc.ErrorInfo (reason,
// metadata), sandhub.common.v1.ErrorDetail (the same reason as an enum) and
// google.rpc.BadRequest. The google/rpc protos come from the
// google-proto-files package (Google's own copy of googleapis), sandhub's
// from proto/.
'use strict';

const path = require('node:path');
const fs = require('node:fs');
const protobuf = require('protobufjs');
const { getProtoPath } = require('google-proto-files');

const INCLUDE_DIRS = [path.resolve(__dirname, '../../../proto'), getProtoPath('..')];

function loadRoot() {
  const root = new protobuf.Root();
  // Imports are resolved against the include directories, as protoc -I does.
  root.resolvePath = (_origin, target) =>
    INCLUDE_DIRS.map((dir) => path.join(dir, target)).find((p) => fs.existsSync(p)) ?? target;
  return root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto',
    'sandhub/common/v1/errors.proto'], { keepCase: true });
}

const root = loadRoot();
const Status = root.lookupType('google.rpc.Status');
const AS_JSON = { enums: String, longs: Number, defaults: true };

// {error_info, error_detail, bad_request, other_details} from a call's trailing metadata.
function decodeStatus(metadata) {
  const out = {};
  const raw = metadata.get('grpc-status-details-bin')[0];
  if (!raw) return out;
  for (const any of Status.decode(raw).details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = root.lookup(name);
    if (!(type instanceof protobuf.Type)) {
      (out.other_details ??= []).push(any.type_url);
      continue;
    }
    const detail = type.toObject(type.decode(any.value), AS_JSON);
    if (name === 'google.rpc.ErrorInfo') out.error_info = detail;
    else if (name === 'sandhub.common.v1.ErrorDetail') out.error_detail = detail.reason;
    else if (name === 'google.rpc.BadRequest') out.bad_request = detail.field_violations;
    else (out.other_details ??= []).push(name);
  }
  return out;
}

module.exports = { decodeStatus };
