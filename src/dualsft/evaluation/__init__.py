"""Evaluation: target accuracy/loss, stability (other tasks, KL(base ‖ tuned)), HumanEval pass@1.

Public API (see ``dualsft.evaluation.evaluate``'s docstring):
    evaluate.evaluate_model(model, tokenizer, base_model, data_dir, cfg) -> {"metrics", "predictions"}
    evaluate.EvalConfig, evaluate.load_eval_sets
    metrics.summarise(values) -> {"mean", "std", "n"};  metrics.aggregate_runs(trees)
    stats.mean_ci(scores [S, Q]) / stats.paired_difference(a, b) -> Interval;  stats.judge, stats.tally
    generate.greedy_generate / generate_texts (batched, left-padded, greedy)
    humaneval.run_program / check_completion (subprocess with timeout)
"""
