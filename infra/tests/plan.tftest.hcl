# `terraform test` plans the root module against a mocked AWS provider: offline, no credentials.
# Run from infra/: terraform init -backend=false && terraform test

mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = {
      account_id = "123456789012"
    }
  }
  mock_data "aws_partition" {
    defaults = {
      partition = "aws"
    }
  }
  mock_data "aws_region" {
    defaults = {
      name = "eu-west-1"
    }
  }
  mock_data "aws_ssm_parameter" {
    defaults = {
      insecure_value = "ami-0123456789abcdef0"
    }
  }
  # Policies are rendered by the provider; the mock returns a placeholder the validators accept.
  mock_data "aws_iam_policy_document" {
    defaults = {
      json = "{}"
    }
  }
  mock_data "aws_subnet" {
    defaults = {
      vpc_id = "vpc-0123456789abcdef0"
    }
  }
}

# aws_region is left null: names and policies take the provider's region (the mock's).
variables {
  subnet_id              = "subnet-0123456789abcdef0"
  github_repository      = "example-org/backorder"
  terraform_state_bucket = "example-terraform-state"
}

run "defaults" {
  command = plan

  assert {
    condition     = length(aws_vpc_security_group_ingress_rule.ssh) == 0
    error_message = "With the default ssh_ingress_cidrs there must be no SSH rule at all."
  }
  assert {
    condition = alltrue([
      for rule in aws_vpc_security_group_ingress_rule.https :
      rule.from_port == 443 && rule.to_port == 443 && rule.ip_protocol == "tcp"
    ]) && length(aws_vpc_security_group_ingress_rule.https) == 1
    error_message = "Ingress must be HTTPS (443/tcp) only."
  }
  assert {
    condition = alltrue([
      for rule in aws_vpc_security_group_egress_rule.https : rule.from_port == 443 && rule.to_port == 443
    ])
    error_message = "Egress must be HTTPS (443/tcp) only."
  }
  assert {
    condition     = aws_instance.app.tags["Name"] == "backorder-app"
    error_message = "The release workflow targets tag:Name=backorder-app."
  }
  assert {
    condition     = aws_instance.app.metadata_options[0].http_tokens == "required"
    error_message = "IMDSv2 must be required."
  }
  assert {
    condition     = aws_instance.app.root_block_device[0].encrypted && aws_instance.app.monitoring && aws_instance.app.ebs_optimized
    error_message = "Root volume encrypted, detailed monitoring and EBS optimisation must be on."
  }
  assert {
    condition     = aws_ecr_repository.app.image_tag_mutability == "IMMUTABLE" && aws_ecr_repository.app.image_scanning_configuration[0].scan_on_push
    error_message = "ECR tags must be immutable and images scanned on push."
  }
  assert {
    condition     = jsondecode(aws_ecr_lifecycle_policy.app.policy).rules[1].selection.countNumber == 30
    error_message = "The ECR lifecycle policy must keep the newest ecr_keep_images images."
  }
  assert {
    condition = toset([for bucket in aws_s3_bucket.product : bucket.bucket]) == toset([
      "backorder-123456789012-eu-west-1-data", "backorder-123456789012-eu-west-1-mlflow",
    ])
    error_message = "Product bucket names are <project>-<account>-<region>-{data,mlflow}."
  }
  assert {
    condition = alltrue([
      for block in aws_s3_bucket_public_access_block.product :
      block.block_public_acls && block.block_public_policy && block.ignore_public_acls && block.restrict_public_buckets
    ])
    error_message = "Public access must be blocked on the product buckets."
  }
  assert {
    condition = alltrue([
      for config in aws_s3_bucket_server_side_encryption_configuration.product :
      one(one(config.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms"
    ])
    error_message = "The product buckets must use SSE-KMS."
  }
  assert {
    condition     = length(aws_iam_openid_connect_provider.github) == 1 && length(data.aws_iam_openid_connect_provider.github) == 0
    error_message = "The OIDC provider is created by default."
  }
  assert {
    condition = anytrue([
      for condition in data.aws_iam_policy_document.github_trust.statement[0].condition :
      condition.variable == "token.actions.githubusercontent.com:sub" && toset(condition.values) == toset([
        "repo:example-org/backorder:ref:refs/heads/main",
        "repo:example-org/backorder:environment:production",
        "repo:example-org/backorder:ref:refs/tags/v*",
      ])
    ])
    error_message = "The deploy role must trust only the repository's main branch, release tags and environment."
  }
}

run "no_release_tags" {
  command = plan

  variables {
    github_release_tag_pattern = ""
  }

  assert {
    condition = alltrue([
      for condition in data.aws_iam_policy_document.github_trust.statement[0].condition :
      !anytrue([for subject in condition.values : strcontains(subject, "refs/tags")])
    ])
    error_message = "An empty github_release_tag_pattern trusts no tag."
  }
}

run "ssh_from_listed_cidrs" {
  command = plan

  variables {
    ssh_ingress_cidrs = ["203.0.113.10/32"]
  }

  assert {
    condition = length(aws_vpc_security_group_ingress_rule.ssh) == 1 && alltrue([
      for rule in aws_vpc_security_group_ingress_rule.ssh :
      rule.from_port == 22 && rule.to_port == 22 && rule.cidr_ipv4 == "203.0.113.10/32"
    ])
    error_message = "A listed CIDR gets exactly one SSH rule on port 22."
  }
}

run "ssh_never_from_everywhere" {
  command = plan

  variables {
    ssh_ingress_cidrs = ["0.0.0.0/0"]
  }

  expect_failures = [var.ssh_ingress_cidrs]
}

run "existing_oidc_provider" {
  command = plan

  variables {
    create_github_oidc_provider = false
  }

  assert {
    condition     = length(aws_iam_openid_connect_provider.github) == 0 && length(data.aws_iam_openid_connect_provider.github) == 1
    error_message = "With create_github_oidc_provider = false the provider is looked up, not created."
  }
}

run "repository_must_be_owner_slash_name" {
  command = plan

  variables {
    github_repository = "backorder"
  }

  expect_failures = [var.github_repository]
}

run "terraform_roles" {
  command = plan

  # The policy's ARN is only known after an apply; the mock's is fixed here for the plan.
  override_resource {
    target          = aws_iam_policy.terraform_apply_boundary
    override_during = plan
    values = {
      arn = "arn:aws:iam::123456789012:policy/backorder-terraform-apply-boundary"
    }
  }

  assert {
    condition     = length(aws_iam_role.github_terraform_plan) == 1 && length(aws_iam_role.github_terraform_apply) == 1
    error_message = "The plan and apply roles are created by default."
  }
  assert {
    condition = anytrue([
      for condition in data.aws_iam_policy_document.github_terraform_apply_trust[0].statement[0].condition :
      condition.variable == "token.actions.githubusercontent.com:sub" && condition.test == "StringEquals" && toset(condition.values) == toset([
        "repo:example-org/backorder:environment:infrastructure",
      ])
    ])
    error_message = "The apply role must trust only the repository's infrastructure environment."
  }
  assert {
    condition = anytrue([
      for condition in data.aws_iam_policy_document.github_terraform_plan_trust[0].statement[0].condition :
      condition.variable == "token.actions.githubusercontent.com:sub" && condition.test == "StringEquals" && toset(condition.values) == toset([
        "repo:example-org/backorder:pull_request",
        "repo:example-org/backorder:ref:refs/heads/main",
      ])
    ])
    error_message = "The plan role must trust only the repository's pull requests and main branch."
  }
  assert {
    condition     = aws_iam_role_policy_attachment.github_terraform_plan_read_only[0].policy_arn == "arn:aws:iam::aws:policy/ReadOnlyAccess"
    error_message = "The plan role is read-only (AWS managed ReadOnlyAccess)."
  }
  assert {
    condition = toset(flatten([
      for statement in data.aws_iam_policy_document.github_terraform_plan[0].statement :
      statement.resources if statement.effect != "Deny" && contains(statement.actions, "s3:PutObject")
      ])) == toset([
      "arn:aws:s3:::example-terraform-state/backorder/production/terraform.tfstate.tflock",
    ])
    error_message = "The plan role may write the state lock and nothing else."
  }
  assert {
    condition     = aws_iam_role.github_terraform_apply[0].permissions_boundary == "arn:aws:iam::123456789012:policy/backorder-terraform-apply-boundary"
    error_message = "The apply role is bounded by the terraform-apply-boundary policy."
  }
  assert {
    condition = anytrue([
      for statement in data.aws_iam_policy_document.terraform_apply_boundary[0].statement :
      statement.effect == "Deny" && contains(statement.actions, "iam:DeleteRolePermissionsBoundary") && contains(statement.resources, "arn:aws:iam::123456789012:role/backorder-github-terraform-apply")
    ])
    error_message = "The apply role may not remove its own permissions boundary."
  }
}

run "deploy_role_uploads_release_stacks" {
  command = plan

  assert {
    condition = anytrue([
      for statement in data.aws_iam_policy_document.github_deploy.statement :
      statement.actions == toset(["s3:PutObject"]) && statement.resources == toset([
        "arn:aws:s3:::backorder-123456789012-eu-west-1-data/releases/*",
      ])
    ])
    error_message = "The deploy role uploads to releases/ of the data bucket only."
  }
  assert {
    condition = anytrue([
      for statement in data.aws_iam_policy_document.instance_s3.statement :
      statement.effect == "Deny" && contains(statement.actions, "s3:PutObject") && statement.resources == toset([
        "arn:aws:s3:::backorder-123456789012-eu-west-1-data/releases/*",
      ])
    ])
    error_message = "The instance reads releases/ but may not replace a release stack."
  }
}

run "no_terraform_roles" {
  command = plan

  variables {
    create_github_terraform_roles = false
    terraform_state_bucket        = null
  }

  assert {
    condition     = length(aws_iam_role.github_terraform_plan) == 0 && length(aws_iam_role.github_terraform_apply) == 0 && length(aws_iam_policy.terraform_apply_boundary) == 0
    error_message = "With create_github_terraform_roles = false no Terraform role is created."
  }
  assert {
    condition     = output.github_terraform_plan_role_arn == null && output.github_terraform_apply_role_arn == null
    error_message = "Without the roles their outputs are null."
  }
}

run "terraform_roles_need_the_state_bucket" {
  command = plan

  variables {
    terraform_state_bucket = null
  }

  expect_failures = [var.terraform_state_bucket]
}
