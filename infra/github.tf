# GitHub Actions deploys with short-lived credentials from OIDC: it pushes the image to ECR,
# uploads the release's compose stack to the data bucket's releases/ prefix and runs SSM
# send-command on the instance. This role cannot change infrastructure; terraform.yml has its own
# plan and apply roles (github_terraform.tf).

locals {
  github_oidc_url = "https://token.actions.githubusercontent.com"
  github_subjects = concat(
    [
      "repo:${var.github_repository}:ref:refs/heads/${var.github_branch}",
      "repo:${var.github_repository}:environment:${var.github_environment}",
    ],
    var.github_release_tag_pattern == "" ? [] : [
      "repo:${var.github_repository}:ref:refs/tags/${var.github_release_tag_pattern}",
    ],
  )
  github_oidc_provider_arn = (
    var.create_github_oidc_provider
    ? aws_iam_openid_connect_provider.github[0].arn
    : data.aws_iam_openid_connect_provider.github[0].arn
  )
}

# An account holds one provider per URL: create it here, or look up the existing one.
resource "aws_iam_openid_connect_provider" "github" {
  count = var.create_github_oidc_provider ? 1 : 0

  url            = local.github_oidc_url
  client_id_list = ["sts.amazonaws.com"]
  # No thumbprint_list: IAM trusts GitHub's certificate through its own CA store.
}

data "aws_iam_openid_connect_provider" "github" {
  count = var.create_github_oidc_provider ? 0 : 1

  url = local.github_oidc_url
}

resource "aws_iam_role" "github_deploy" {
  name                 = "${var.project}-github-deploy"
  description          = "GitHub Actions (${var.github_repository}): push the image to ECR, deploy through SSM"
  assume_role_policy   = data.aws_iam_policy_document.github_trust.json
  max_session_duration = 3600
}

# Only this repository's main branch, its release tags (the image job runs on a tag push, with
# no environment), or its jobs that run in the deployment environment (the deploy job).
data "aws_iam_policy_document" "github_trust" {
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
      test     = "StringLike"
      variable = "token.actions.githubusercontent.com:sub"
      values   = local.github_subjects
    }
  }
}

resource "aws_iam_role_policy" "github_deploy" {
  name   = "push-and-deploy"
  role   = aws_iam_role.github_deploy.id
  policy = data.aws_iam_policy_document.github_deploy.json
}

data "aws_iam_policy_document" "github_deploy" {
  statement {
    sid = "EcrLogin"
    # GetAuthorizationToken has no resource-level permissions: "*" is the only valid resource.
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }
  statement {
    sid = "PushProductImage"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:CompleteLayerUpload",
      "ecr:DescribeImageScanFindings",
      "ecr:DescribeImages",
      "ecr:GetDownloadUrlForLayer",
      "ecr:InitiateLayerUpload",
      "ecr:PutImage",
      "ecr:UploadLayerPart",
    ]
    resources = [aws_ecr_repository.app.arn]
  }
  # The release's compose stack (compose.yaml, deploy/, .env.example; never .env), which the
  # instance downloads at deploy time. Writes only: the workflow never reads the product's data.
  statement {
    sid       = "UploadReleaseStack"
    actions   = ["s3:PutObject"]
    resources = local.release_stacks_arns
  }
  statement {
    sid = "ReleaseStackKeyThroughS3"
    # The data bucket is SSE-KMS: a PutObject needs a data key (and Decrypt for multipart uploads).
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.main.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${local.region}.amazonaws.com"]
    }
  }
  statement {
    sid     = "SendCommandToAppInstance"
    actions = ["ssm:SendCommand"]
    # Instances of this account and region tagged Name = <project>-app (the workflow targets
    # tag:Name), so a replaced instance keeps working without a policy change.
    resources = ["arn:${local.partition}:ec2:${local.region}:${local.account_id}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ssm:resourceTag/Name"
      values   = [local.instance_name]
    }
  }
  statement {
    sid       = "SendCommandDocument"
    actions   = ["ssm:SendCommand"]
    resources = ["arn:${local.partition}:ssm:${local.region}::document/AWS-RunShellScript"]
  }
  statement {
    sid = "FindInstanceAndFollowCommands"
    # These have no resource-level permissions: "*" is the only valid resource. The release
    # workflow finds the instance by its Name tag, then polls the command's invocation.
    actions = [
      "ec2:DescribeInstances",
      "ssm:GetCommandInvocation",
      "ssm:ListCommandInvocations",
      "ssm:ListCommands",
    ]
    resources = ["*"]
  }
}
