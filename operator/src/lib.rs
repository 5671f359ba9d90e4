//! deepseek-operator: reconciles `DeepSeekDeployment` resources into expert-parallel engine groups.
