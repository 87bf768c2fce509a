# The roles .github/workflows/terraform.yml assumes through GitHub OIDC: one to plan, one to apply.
# Pull requests run code that nobody has reviewed yet, so the role they can reach only reads;
# the role that changes infrastructure is reachable only from a job in the `infrastructure`
# environment, which waits for a required reviewer and runs on main only.
#
# Chicken and egg: both roles are created by a first `terraform apply` that an administrator runs
# with their own credentials (see README.md, "First apply"). Changes to the apply role or its
# permissions boundary need that administrator again: the boundary forbids the role to edit either.

locals {
  terraform_roles          = var.create_github_terraform_roles ? 1 : 0
  terraform_apply_role     = "${var.project}-github-terraform-apply"
  terraform_apply_boundary = "${var.project}-terraform-apply-boundary"
  # The bucket may be null only with the roles off (its validation), when nothing reads these.
  terraform_state_bucket = "arn:${local.partition}:s3:::${coalesce(var.terraform_state_bucket, "unset")}"
  terraform_state_object = "${local.terraform_state_bucket}/${var.terraform_state_key}"
  # S3-native locking (use_lockfile): the lock is this object beside the state.
  terraform_lock_object = "${local.terraform_state_object}.tflock"
}

# -- plan: pull requests and main, read-only ---------------------------------------------------
resource "aws_iam_role" "github_terraform_plan" {
  count = local.terraform_roles

  name                 = "${var.project}-github-terraform-plan"
  description          = "GitHub Actions (${var.github_repository}): terraform plan of infra/ (read-only, state lock)"
  assume_role_policy   = data.aws_iam_policy_document.github_terraform_plan_trust[0].json
  max_session_duration = 3600
}

# Pull requests of this repository (fork PRs get no OIDC token) and pushes to the main branch.
data "aws_iam_policy_document" "github_terraform_plan_trust" {
  count = local.terraform_roles

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [local.github_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "token.actions.githubusercontent.com:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "token.actions.githubusercontent.com:sub"
      values = [
        "repo:${var.github_repository}:pull_request",
        "repo:${var.github_repository}:ref:refs/heads/${var.github_branch}",
      ]
    }
  }
}

# Refreshing every resource of the module needs Describe/Get/List across EC2, S3, ECR, KMS, IAM
# and SSM; AWS's ReadOnlyAccess is maintained as those APIs grow, a hand-written list is not.
resource "aws_iam_role_policy_attachment" "github_terraform_plan_read_only" {
  count = local.terraform_roles

  role       = aws_iam_role.github_terraform_plan[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/ReadOnlyAccess"
}

resource "aws_iam_role_policy" "github_terraform_plan" {
  count = local.terraform_roles

  name   = "state-lock-and-no-data-reads"
  role   = aws_iam_role.github_terraform_plan[0].id
  policy = data.aws_iam_policy_document.github_terraform_plan[0].json
}

data "aws_iam_policy_document" "github_terraform_plan" {
  count = local.terraform_roles

  statement {
    sid       = "ListState"
    actions   = ["s3:ListBucket"]
    resources = [local.terraform_state_bucket]
  }
  # Read the state, never write it: a pull request must not be able to rewrite what the next
  # apply believes exists. The lock is written and deleted by every plan (S3-native locking), so
  # a plan never reads a state that an apply is halfway through.
  statement {
    sid       = "ReadState"
    actions   = ["s3:GetObject"]
    resources = [local.terraform_state_object]
  }
  statement {
    sid       = "TakeAndReleaseTheLock"
    actions   = ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
    resources = [local.terraform_lock_object]
  }
  # ReadOnlyAccess also reads data (any S3 object, SSM SecureString parameters). A plan needs
  # none of it, and pull-request code should not reach it. (The product buckets are SSE-KMS and
  # the role has no kms:Decrypt; this covers everything else in the account.)
  statement {
    sid    = "NoObjectReadsButTheState"
    effect = "Deny"
    actions = [
      "s3:GetObject",
      "s3:GetObjectVersion",
    ]
    not_resources = [local.terraform_state_object, local.terraform_lock_object]
  }
  statement {
    sid    = "NoParametersButPublicOnes"
    effect = "Deny"
    actions = [
      "ssm:GetParameter",
      "ssm:GetParameterHistory",
      "ssm:GetParameters",
      "ssm:GetParametersByPath",
    ]
    # The AMI comes from AWS's public parameter; the account's own parameters may be secret.
    not_resources = ["arn:${local.partition}:ssm:*::parameter/aws/service/*"]
  }
  statement {
    sid       = "NoSecrets"
    effect    = "Deny"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = ["*"]
  }
}

# -- apply: the infrastructure environment only, bounded administrator -------------------------
resource "aws_iam_role" "github_terraform_apply" {
  count = local.terraform_roles

  name                 = local.terraform_apply_role
  description          = "GitHub Actions (${var.github_repository}), environment ${var.github_terraform_environment}: terraform apply of infra/"
  assume_role_policy   = data.aws_iam_policy_document.github_terraform_apply_trust[0].json
  permissions_boundary = aws_iam_policy.terraform_apply_boundary[0].arn
  max_session_duration = 3600
}

# Only jobs that run in the `infrastructure` environment: not a branch, not a pull request, not
# a tag. GitHub holds such a job until a required reviewer approves it.
data "aws_iam_policy_document" "github_terraform_apply_trust" {
  count = local.terraform_roles

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [local.github_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "token.actions.githubusercontent.com:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "token.actions.githubusercontent.com:sub"
      values   = ["repo:${var.github_repository}:environment:${var.github_terraform_environment}"]
    }
  }
}

# AdministratorAccess grants; the permissions boundary below decides. The module creates KMS
# keys, IAM roles and EC2 resources whose ARNs do not exist before the apply, so an exact list
# would be rewritten with every change of the module; the boundary keeps the reach to the
# services and names of this module instead.
resource "aws_iam_role_policy_attachment" "github_terraform_apply_admin" {
  #checkov:skip=CKV_AWS_274:The apply role's effective permissions are AdministratorAccess intersected with the terraform-apply-boundary policy (this module's services and names only); only reviewed jobs of the infrastructure environment can assume it.
  count = local.terraform_roles

  role       = aws_iam_role.github_terraform_apply[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AdministratorAccess"
}

resource "aws_iam_policy" "terraform_apply_boundary" {
  count = local.terraform_roles

  name        = local.terraform_apply_boundary
  description = "Permissions boundary of ${local.terraform_apply_role}: the services and names of the ${var.project} module"
  policy      = data.aws_iam_policy_document.terraform_apply_boundary[0].json
}

data "aws_iam_policy_document" "terraform_apply_boundary" {
  #checkov:skip=CKV_AWS_356:A permissions boundary grants nothing by itself. "*" remains only where no ARN exists before the resource does (ec2:*, kms:CreateKey, both held to the module's region) and for iam:Get*/List*, which read.
  count = local.terraform_roles

  # EC2 has no ARN for a resource that does not exist yet (RunInstances alone touches a dozen
  # resource types): the whole service, in the module's region only.
  statement {
    sid       = "Ec2InTheRegion"
    actions   = ["ec2:*"]
    resources = ["*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestedRegion"
      values   = [local.region]
    }
  }
  statement {
    sid       = "ModuleRepository"
    actions   = ["ecr:*"]
    resources = ["arn:${local.partition}:ecr:${local.region}:${local.account_id}:repository/${var.project}"]
  }
  statement {
    sid = "CreateKeys"
    # TagResource: a key created with tags (the provider's default_tags) is tagged before it has an ARN.
    actions   = ["kms:CreateKey", "kms:ListAliases", "kms:ListKeys", "kms:TagResource"]
    resources = ["*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestedRegion"
      values   = [local.region]
    }
  }
  statement {
    sid     = "ModuleKeys"
    actions = ["kms:*"]
    resources = [
      "arn:${local.partition}:kms:${local.region}:${local.account_id}:key/*",
      "arn:${local.partition}:kms:${local.region}:${local.account_id}:alias/${var.project}",
    ]
  }
  statement {
    sid       = "ModuleBuckets"
    actions   = ["s3:*"]
    resources = ["arn:${local.partition}:s3:::${var.project}-*"]
  }
  statement {
    sid = "ModuleIam"
    actions = [
      "iam:*",
    ]
    resources = [
      "arn:${local.partition}:iam::${local.account_id}:role/${var.project}-*",
      "arn:${local.partition}:iam::${local.account_id}:policy/${var.project}-*",
      "arn:${local.partition}:iam::${local.account_id}:instance-profile/${var.project}-*",
      "arn:${local.partition}:iam::${local.account_id}:oidc-provider/token.actions.githubusercontent.com",
    ]
  }
  statement {
    sid       = "ReadIam"
    actions   = ["iam:Get*", "iam:List*"]
    resources = ["*"]
  }
  statement {
    sid       = "AmiParameter"
    actions   = ["ssm:GetParameter", "ssm:GetParameters"]
    resources = ["arn:${local.partition}:ssm:*::parameter/aws/service/*"]
  }
  statement {
    sid       = "ListState"
    actions   = ["s3:ListBucket"]
    resources = [local.terraform_state_bucket]
  }
  statement {
    sid       = "ReadWriteStateAndLock"
    actions   = ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
    resources = [local.terraform_state_object, local.terraform_lock_object]
  }
  # Bounded only if the bound stays: the role may not edit itself, drop or rewrite its boundary.
  statement {
    sid    = "KeepTheApplyRoleAndItsBoundary"
    effect = "Deny"
    actions = [
      "iam:AttachRolePolicy",
      "iam:CreatePolicyVersion",
      "iam:DeletePolicy",
      "iam:DeletePolicyVersion",
      "iam:DeleteRole",
      "iam:DeleteRolePermissionsBoundary",
      "iam:DeleteRolePolicy",
      "iam:DetachRolePolicy",
      "iam:PutRolePermissionsBoundary",
      "iam:PutRolePolicy",
      "iam:SetDefaultPolicyVersion",
      "iam:UpdateAssumeRolePolicy",
    ]
    resources = [
      "arn:${local.partition}:iam::${local.account_id}:role/${local.terraform_apply_role}",
      "arn:${local.partition}:iam::${local.account_id}:policy/${local.terraform_apply_boundary}",
    ]
  }
  statement {
    sid       = "NoAdministratorPolicies"
    effect    = "Deny"
    actions   = ["iam:AttachRolePolicy"]
    resources = ["*"]
    # So an apply cannot mint another administrator. (Listed literally: checkov skips a whole
    # document whose values come from a for expression.)
    condition {
      test     = "ArnEquals"
      variable = "iam:PolicyARN"
      values = [
        "arn:${local.partition}:iam::aws:policy/AdministratorAccess",
        "arn:${local.partition}:iam::aws:policy/IAMFullAccess",
        "arn:${local.partition}:iam::aws:policy/PowerUserAccess",
      ]
    }
  }
}
