//! template.yaml's execution roles grant each function exactly what its code does
//! (`dualsync_lambda::permissions::needs`): every needed action on the right resource, nothing
//! else, no wildcard. Moto grants every call, so the end-to-end tests cannot see a missing or a
//! needless permission; this test reads the template instead.
use std::collections::BTreeSet;

use dualsync::adapters::aws::Names;
use dualsync_lambda::input_var;
use dualsync_lambda::permissions::{
    needs, Function, QueueId, LOG_ACTIONS, PARAMETER_ACTIONS, PARAMETER_ARNS_PARAMETER, SECRET_ACTIONS,
    SECRET_ARNS_PARAMETER, TABLE_ACTIONS,
};
use serde_yaml_ng::Value;

const TEMPLATE: &str = include_str!("../../template.yaml");
/// The state table's resource in the template.
const TABLE: &str = "StateTable";

/// `!GetAtt X.Arn` -> `X`.
fn arn_of(v: &Value) -> Option<&str> {
    match v {
        Value::Tagged(t) if t.tag == "GetAtt" => t.value.as_str()?.strip_suffix(".Arn"),
        _ => None,
    }
}

/// `!Ref X` -> `X`.
fn ref_of(v: &Value) -> Option<&str> {
    match v {
        Value::Tagged(t) if t.tag == "Ref" => t.value.as_str(),
        _ => None,
    }
}

/// `!Sub text` -> `text`.
fn sub_of(v: &Value) -> Option<&str> {
    match v {
        Value::Tagged(t) if t.tag == "Sub" => t.value.as_str(),
        _ => None,
    }
}

/// `!<tag> [items]` -> items.
fn args<'a>(v: &'a Value, tag: &str) -> Option<&'a [Value]> {
    match v {
        Value::Tagged(t) if t.tag == tag => t.value.as_sequence().map(|s| s.as_slice()),
        _ => None,
    }
}

/// `!If [Condition, statement, !Ref AWS::NoValue]` -> (Some(Condition), statement): a statement
/// that is left out when the condition is false; a plain statement -> (None, it).
fn conditional(st: &Value) -> Result<(Option<&str>, &Value), String> {
    let Some(a) = args(st, "If") else { return Ok((None, st)) };
    match a {
        [cond, then, otherwise] if ref_of(otherwise) == Some("AWS::NoValue") && cond.as_str().is_some() => {
            Ok((cond.as_str(), then))
        }
        _ => Err(format!("{} is not !If [Condition, statement, !Ref AWS::NoValue]", show(st))),
    }
}

/// Whether `condition` is `!Not [!Equals [!Join ["", !Ref <param>], ""]]`: true only when the
/// list parameter names something.
fn guards_empty(doc: &Value, condition: &str, param: &str) -> bool {
    let c = &doc["Conditions"][condition];
    let Some([equals]) = args(c, "Not") else { return false };
    let Some([join, empty]) = args(equals, "Equals") else { return false };
    let Some([sep, list]) = args(join, "Join") else { return false };
    empty.as_str() == Some("") && sep.as_str() == Some("") && ref_of(list) == Some(param)
}

/// A value that may be one item or a list of them.
fn one_or_many(v: Option<&Value>) -> Vec<&Value> {
    match v {
        None => vec![],
        Some(Value::Sequence(items)) => items.iter().collect(),
        Some(one) => vec![one],
    }
}

/// Something the template says that a reader of the roles has to look at.
fn show(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default().trim().replace('\n', " ")
}

type Grant = (String, String);

/// Every (action, resource) the inline policies of `role` allow, or what makes them more than
/// an explicit list.
fn role_grants(doc: &Value, role: &str, problems: &mut Vec<String>) -> BTreeSet<Grant> {
    let resources = &doc["Resources"];
    let mut grants = BTreeSet::new();
    let Some(props) = resources.get(role).filter(|r| r["Type"] == "AWS::IAM::Role").map(|r| &r["Properties"]) else {
        problems.push(format!("{role} is not an AWS::IAM::Role of the template"));
        return grants;
    };
    for key in ["ManagedPolicyArns", "PermissionsBoundary"] {
        if props.get(key).is_some() {
            problems.push(format!("{role} has {key}: only its inline policies are checked"));
        }
    }
    let trust = &props["AssumeRolePolicyDocument"]["Statement"];
    let lambda_only = one_or_many(Some(trust)).iter().all(|s| {
        s["Effect"] == "Allow" && s["Principal"]["Service"] == "lambda.amazonaws.com" && s["Action"] == "sts:AssumeRole"
    });
    if !lambda_only {
        problems.push(format!("{role} may be assumed by more than Lambda: {}", show(trust)));
    }
    for policy in one_or_many(props.get("Policies")) {
        for (i, st) in one_or_many(policy["PolicyDocument"].get("Statement")).into_iter().enumerate() {
            let (condition, st) = match conditional(st) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(format!("{role} statement {i}: {e}"));
                    continue;
                }
            };
            let at = format!(
                "{role} policy {} statement {}",
                show(&policy["PolicyName"]),
                st.get("Sid").map_or(i.to_string(), show)
            );
            for key in ["NotAction", "NotResource", "NotPrincipal"] {
                if st.get(key).is_some() {
                    problems.push(format!("{at}: {key} allows everything but a list"));
                }
            }
            if st["Effect"] != "Allow" {
                problems.push(format!("{at}: Effect is {}, only Allow statements are expected", show(&st["Effect"])));
            }
            let mut actions = Vec::new();
            for a in one_or_many(st.get("Action")) {
                match a.as_str() {
                    Some(a) if a.contains('*') => problems.push(format!("{at}: wildcard in Action '{a}'")),
                    Some(a) => actions.push(a.to_string()),
                    None => problems.push(format!("{at}: Action {} is not a plain action name", show(a))),
                }
            }
            for r in one_or_many(st.get("Resource")) {
                match (arn_of(r), r.as_str()) {
                    (Some(id), _) => grants.extend(actions.iter().map(|a| (a.clone(), id.to_string()))),
                    // A list parameter of ARNs (the apps' secrets): granted only when it names
                    // something, so the empty default grants nothing.
                    (None, _) if ref_of(r).is_some_and(|p| doc["Parameters"].get(p).is_some()) => {
                        let param = ref_of(r).unwrap_or_default();
                        if condition.is_some_and(|c| guards_empty(doc, c, param)) {
                            grants.extend(actions.iter().map(|a| (a.clone(), param.to_string())));
                        } else {
                            problems.push(format!(
                                "{at}: Resource !Ref {param} is not under !If [<condition>, ..., !Ref AWS::NoValue] with the condition that {param} is not empty"
                            ));
                        }
                    }
                    (None, Some(s)) if s.contains('*') => problems.push(format!("{at}: wildcard in Resource '{s}'")),
                    (None, _) => problems.push(format!(
                        "{at}: Resource {} is not !GetAtt <resource>.Arn or !Ref <parameter> of this template",
                        show(r)
                    )),
                }
            }
        }
    }
    grants
}

/// What `function` needs: its queues' actions, the table's, and its logs' on `log_group`.
fn needed(function: Function, log_group: &str) -> BTreeSet<Grant> {
    let mut want: BTreeSet<Grant> =
        needs(function).queue_actions().into_iter().map(|(a, q)| (a.to_string(), q.logical_id())).collect();
    want.extend(TABLE_ACTIONS.iter().map(|a| (a.to_string(), TABLE.to_string())));
    want.extend(LOG_ACTIONS.iter().map(|a| (a.to_string(), log_group.to_string())));
    if needs(function).calls_apps {
        want.extend(SECRET_ACTIONS.iter().map(|a| (a.to_string(), SECRET_ARNS_PARAMETER.to_string())));
        want.extend(PARAMETER_ACTIONS.iter().map(|a| (a.to_string(), PARAMETER_ARNS_PARAMETER.to_string())));
    }
    want
}

/// Everything in `template` that grants more or less than the code needs, one line each.
fn check(template: &str) -> Vec<String> {
    let doc: Value = serde_yaml_ng::from_str(template).expect("template.yaml is YAML");
    let resources = &doc["Resources"];
    let mut problems = Vec::new();
    for key in ["Role", "Policies"] {
        if doc["Globals"]["Function"].get(key).is_some() {
            problems.push(format!("Globals.Function sets {key}: every function names its own role"));
        }
    }
    // The names the code computes are those of the resources the roles name.
    let stage = Names::new("${Stage}");
    let name_of = |id: &str, key: &str| resources[id]["Properties"].get(key).and_then(sub_of).map(str::to_string);
    if name_of(TABLE, "TableName") != Some(stage.table()) {
        problems.push(format!("{TABLE}'s TableName is not !Sub {}", stage.table()));
    }
    for q in QueueId::WORK.into_iter().chain(QueueId::DEAD_LETTER) {
        if name_of(&q.logical_id(), "QueueName") != Some(q.name(&stage)) {
            problems.push(format!("{}'s QueueName is not !Sub {}", q.logical_id(), q.name(&stage)));
        }
    }

    let mut seen = Vec::new();
    let functions =
        resources.as_mapping().into_iter().flatten().filter(|(_, r)| r["Type"] == "AWS::Serverless::Function");
    for (id, resource) in functions {
        let id = id.as_str().unwrap_or_default();
        let binary = resource["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap_or_default();
        let Some(function) = Function::ALL.into_iter().find(|f| f.binary() == binary) else {
            problems.push(format!("{id}: binary '{binary}' is not one of permissions::Function"));
            continue;
        };
        seen.push(function);
        let props = &resource["Properties"];
        if props.get("Policies").is_some() {
            problems.push(format!("{id} has Policies: SAM would add them to a role of its own"));
        }
        let Some(role) = props.get("Role").and_then(arn_of) else {
            problems.push(format!("{id}: Role is not !GetAtt <role>.Arn of this template"));
            continue;
        };
        let Some(log_group) = props["LoggingConfig"].get("LogGroup").and_then(ref_of) else {
            problems.push(format!("{id}: LoggingConfig.LogGroup is not !Ref <log group>"));
            continue;
        };
        let want = needed(function, log_group);
        let have = role_grants(&doc, role, &mut problems);
        for (action, on) in want.difference(&have) {
            problems.push(format!("{binary} ({role}) lacks {action} on {on}"));
        }
        for (action, on) in have.difference(&want) {
            problems.push(format!("{binary} ({role}) has {action} on {on}, which its code does not use"));
        }
        // The event source mapping polls the input queue the declaration names.
        let sources: Vec<Option<&str>> = props["Events"]
            .as_mapping()
            .into_iter()
            .flatten()
            .filter(|(_, e)| e["Type"] == "SQS")
            .map(|(_, e)| arn_of(&e["Properties"]["Queue"]))
            .collect();
        let input = needs(function).input;
        let input_id = input.map(|q| q.logical_id());
        if sources != input_id.as_deref().into_iter().map(Some).collect::<Vec<_>>() {
            problems.push(format!("{id}: SQS event sources {sources:?}, but its input queue is {input_id:?}"));
        }
        // ... and the handler reads the same queue's URL as its input (env.rs).
        if let Some(QueueId::Work(step)) = input {
            let var = input_var(step);
            let url = props["Environment"]["Variables"]
                .get(var)
                .or(doc["Globals"]["Function"]["Environment"]["Variables"].get(var));
            if url.and_then(ref_of) != input_id.as_deref() {
                problems.push(format!("{id}: {var} is not !Ref {}", input_id.unwrap_or_default()));
            }
        }
    }
    for f in Function::ALL {
        if seen.iter().filter(|s| **s == f).count() != 1 {
            problems.push(format!("the template should deploy function '{}' exactly once", f.binary()));
        }
    }
    problems
}

#[test]
fn every_role_grants_what_its_function_does_and_nothing_else() {
    let problems = check(TEMPLATE);
    assert!(problems.is_empty(), "template.yaml:\n  {}", problems.join("\n  "));
}

#[test]
fn names_a_missing_grant_an_extra_one_a_misread_input_and_a_wildcard() {
    // Capture's role, the first one: polls with PurgeQueue instead of ChangeMessageVisibility.
    let swapped = TEMPLATE.replacen("- sqs:ChangeMessageVisibility", "- sqs:PurgeQueue", 1);
    assert_eq!(
        check(&swapped),
        [
            "capture (CaptureRole) lacks sqs:ChangeMessageVisibility on CaptureQueue",
            "capture (CaptureRole) has sqs:PurgeQueue on CaptureQueue, which its code does not use",
        ]
    );
    // Reconcile's handler would read its input from the wrong queue.
    let misread =
        TEMPLATE.replacen("RECONCILE_QUEUE_URL: !Ref ReconcileQueue", "RECONCILE_QUEUE_URL: !Ref DeliverQueue", 1);
    assert_eq!(check(&misread), ["ReconcileFunction: RECONCILE_QUEUE_URL is not !Ref ReconcileQueue"]);
    let wild = TEMPLATE.replacen("Resource: !GetAtt StateTable.Arn", "Resource: \"*\"", 1);
    let problems = check(&wild);
    assert!(
        problems.iter().any(|p| p == "CaptureRole policy capture statement State: wildcard in Resource '*'"),
        "{problems:?}"
    );
    // Deliver without its secrets grant; sequence with one (it never calls an app).
    let no_secrets = TEMPLATE.replacen(
        "Resource: !GetAtt DeliverQueue.Arn\n              - !If\n                - ReadsAppSecrets",
        "Resource: !GetAtt DeliverQueue.Arn\n              - !If\n                - ReadsAppSecretsNot",
        1,
    );
    let no_secrets = no_secrets.replacen("Conditions:\n", "Conditions:\n  ReadsAppSecretsNot: !Equals [a, a]\n", 1);
    let problems = check(&no_secrets);
    assert!(
        problems.iter().any(|p| p.starts_with(
            "DeliverRole policy deliver statement AppSecrets: Resource !Ref AppSecretArns is not under !If"
        )),
        "{problems:?}"
    );
    assert!(
        problems.contains(&"deliver (DeliverRole) lacks secretsmanager:GetSecretValue on AppSecretArns".to_string()),
        "{problems:?}"
    );
    let extra = TEMPLATE.replacen(
        "                Resource: !GetAtt DeliverQueue.Arn\n\n  DeliverRole:",
        "                Resource: !GetAtt DeliverQueue.Arn\n              - !If\n                - ReadsAppParameters\n                - { Sid: P, Effect: Allow, Action: ssm:GetParameter, Resource: !Ref AppParameterArns }\n                - !Ref AWS::NoValue\n\n  DeliverRole:",
        1,
    );
    assert_eq!(
        check(&extra),
        ["sequence (SequenceRole) has ssm:GetParameter on AppParameterArns, which its code does not use"]
    );
    let wild = TEMPLATE.replacen("- dynamodb:Query", "- dynamodb:*", 1);
    let problems = check(&wild);
    assert!(problems.iter().any(|p| p.ends_with("wildcard in Action 'dynamodb:*'")), "{problems:?}");
}

#[test]
fn the_ingress_role_sends_to_the_capture_queue_only() {
    let to_sequence = TEMPLATE.replacen(
        "              - Sid: SendToCapture\n                Effect: Allow\n                Action: sqs:SendMessage\n                Resource: !GetAtt CaptureQueue.Arn",
        "              - Sid: SendToCapture\n                Effect: Allow\n                Action: sqs:SendMessage\n                Resource: !GetAtt SequenceQueue.Arn",
        1,
    );
    assert_ne!(to_sequence, TEMPLATE, "the ingress role's statement is where this test expects it");
    assert_eq!(
        check(&to_sequence),
        [
            "ingress (IngressRole) lacks sqs:SendMessage on CaptureQueue",
            "ingress (IngressRole) has sqs:SendMessage on SequenceQueue, which its code does not use",
        ]
    );
}

/// Only the ingress function is open to unsigned requests (its apps' keys authenticate them);
/// every other function URL needs SigV4.
#[test]
fn only_the_ingress_function_url_takes_unsigned_requests() {
    let doc: Value = serde_yaml_ng::from_str(TEMPLATE).unwrap();
    let mut urls: Vec<(String, String)> = doc["Resources"]
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(id, r)| {
            let auth = r["Properties"].get("FunctionUrlConfig")?["AuthType"].as_str()?.to_string();
            Some((r["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap_or(id.as_str()?).to_string(), auth))
        })
        .collect();
    urls.sort();
    assert_eq!(urls, [("admin".to_string(), "AWS_IAM".to_string()), ("ingress".into(), "NONE".into())]);
}
