output "instance_id" {
  description = "ID of the app instance (SSM target; also reachable as tag:Name = instance_name)."
  value       = aws_instance.app.id
}

output "instance_name" {
  description = "Name tag of the app instance, what the release workflow targets with SSM send-command."
  value       = local.instance_name
}

output "public_ip" {
  description = "Elastic IP of the app instance: point the DNS record for HTTPS here."
  value       = aws_eip.app.public_ip
}

output "security_group_id" {
  description = "Security group of the app instance."
  value       = aws_security_group.app.id
}

output "ecr_repository_url" {
  description = "ECR repository URL to tag and push the product image to (immutable tags)."
  value       = aws_ecr_repository.app.repository_url
}

output "data_bucket" {
  description = "S3 bucket for landed batches and predictions (BACKORDER_LANDING_ROOT = s3://<bucket>/landing)."
  value       = aws_s3_bucket.product["data"].id
}

output "mlflow_bucket" {
  description = "S3 bucket for MLflow artifacts and models (BACKORDER_ARTIFACT_LOCATION = s3://<bucket>/mlflow)."
  value       = aws_s3_bucket.product["mlflow"].id
}

output "access_log_bucket" {
  description = "S3 bucket receiving the server access logs of the data and MLflow buckets."
  value       = aws_s3_bucket.access_logs.id
}

output "kms_key_arn" {
  description = "ARN of the KMS key encrypting the data and MLflow buckets and the ECR images."
  value       = aws_kms_key.main.arn
}

output "instance_role_arn" {
  description = "ARN of the app instance's IAM role (SSM, ECR pull, the product buckets)."
  value       = aws_iam_role.instance.arn
}

output "github_deploy_role_arn" {
  description = "ARN of the role GitHub Actions assumes through OIDC (aws-actions/configure-aws-credentials role-to-assume)."
  value       = aws_iam_role.github_deploy.arn
}

output "github_oidc_provider_arn" {
  description = "ARN of the GitHub Actions OIDC provider the deploy role trusts (created or looked up)."
  value       = local.github_oidc_provider_arn
}

output "github_terraform_plan_role_arn" {
  description = "ARN of the read-only role terraform.yml's plan job assumes (repository variable AWS_TERRAFORM_PLAN_ROLE_ARN); null when create_github_terraform_roles is false."
  value       = one(aws_iam_role.github_terraform_plan[*].arn)
}

output "github_terraform_apply_role_arn" {
  description = "ARN of the role terraform.yml's apply job assumes in the infrastructure environment (AWS_TERRAFORM_APPLY_ROLE_ARN); null when create_github_terraform_roles is false."
  value       = one(aws_iam_role.github_terraform_apply[*].arn)
}

output "release_bundle_prefix" {
  description = "Where the release workflow uploads each release's compose stack (s3://<data bucket>/releases/<tag>/stack.tar.gz); the instance downloads it from there."
  value       = "s3://${aws_s3_bucket.product["data"].id}/${local.release_prefix}"
}
