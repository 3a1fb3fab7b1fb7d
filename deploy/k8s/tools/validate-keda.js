// Validates KEDA objects (one JSON array on stdin) against KEDA's CRD schemas, compiled into the
// @kubernetes-models/keda package. Prints one line per invalid object; exits 1 if any.
"use strict";
const kinds = {
  ScaledObject: require("@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject").ScaledObject,
  ScaledJob: require("@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob").ScaledJob,
  TriggerAuthentication: require("@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication").TriggerAuthentication,
};
const objects = JSON.parse(require("fs").readFileSync(0, "utf8"));
let failed = 0;
for (const obj of objects) {
  const name = `${obj.kind}/${(obj.metadata || {}).name}`;
  const Model = kinds[obj.kind];
  if (obj.apiVersion !== "keda.sh/v1alpha1" || !Model) {
    console.log(`${name}: not a KEDA keda.sh/v1alpha1 kind this checker knows`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
  } catch (err) {
    console.log(`${name}: ${err.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
